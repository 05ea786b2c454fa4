// How a prompt is rewritten before any tokenizer reads it: the manifest's components/prompt_encoding/preprocessing,
// as l2c_export/core/text_stack.py preprocess does it. Internal to the library.
#pragma once

#include <string>

namespace l2c::detail {

// `text` (valid UTF-8) rewritten by `kind`: "none", as given; "lower_strip" (PixArt's), lower-cased and stripped;
// "wan_prompt_clean" (WanPipeline's prompt_clean as the Python runtime runs it without ftfy), the HTML unescaped twice
// as Python's html.unescape does, stripped, every run of whitespace one space. l2c::Error "<where>: ..." for a text
// the kind refuses: non-ASCII text for lower_strip (the C++ runtime lower-cases ASCII only); for wan_prompt_clean, a
// text ftfy.fix_text could change (a character past printable ASCII but tabs and line breaks, an HTML entity with its
// semicolon), as the Python runtime refuses it without ftfy.
std::string preprocess_prompt(const std::string& text, const std::string& kind, const std::string& where);

}  // namespace l2c::detail
