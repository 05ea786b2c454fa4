// Prompt preprocessing (preprocessing.hpp), as l2c_export/core/text_stack.py preprocess does it. WanPipeline's
// prompt_clean is ftfy.fix_text, html.unescape twice, strip, whitespace runs to one space, strip; the Python runtime
// without ftfy refuses the texts ftfy could change, and l2c-run never has ftfy: it refuses them too and unescapes
// what is left as Python's html.unescape does. What is left is printable ASCII (tabs and line breaks too) with no
// "&name;" or "&#number;" entity, so the first unescaping meets only the references without a semicolon (numeric
// ones, HTML's 106 legacy names, a legacy name's longest prefix of a longer word: "&ampx" is "&x"); the second meets
// what the first made ("&amp#233;" is "&#233;", then "é"), any other named entity being refused (it could be one of
// HTML5's 2,231 names, which l2c-run does not carry).
#include "preprocessing.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>

#include "l2c/error.hpp"

namespace l2c::detail {

namespace {

// Python's str.isspace: what str.strip removes. The pipeline's whitespace regex (the regex module's \s) is the same
// but for U+001C..U+001F, which neither a kept text nor an unescaped reference can hold.
bool python_space(char32_t c) {
  return (c >= 0x9 && c <= 0xd) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// html.entities.html5's names without a semicolon (each also named with one, the same character).
std::optional<char32_t> legacy_entity(const std::u32string& name) {
  static const std::map<std::u32string, char32_t> names = {
    {U"AElig", 0xc6}, {U"AMP", 0x26}, {U"Aacute", 0xc1}, {U"Acirc", 0xc2}, {U"Agrave", 0xc0}, {U"Aring", 0xc5},
    {U"Atilde", 0xc3}, {U"Auml", 0xc4}, {U"COPY", 0xa9}, {U"Ccedil", 0xc7}, {U"ETH", 0xd0}, {U"Eacute", 0xc9},
    {U"Ecirc", 0xca}, {U"Egrave", 0xc8}, {U"Euml", 0xcb}, {U"GT", 0x3e}, {U"Iacute", 0xcd}, {U"Icirc", 0xce},
    {U"Igrave", 0xcc}, {U"Iuml", 0xcf}, {U"LT", 0x3c}, {U"Ntilde", 0xd1}, {U"Oacute", 0xd3}, {U"Ocirc", 0xd4},
    {U"Ograve", 0xd2}, {U"Oslash", 0xd8}, {U"Otilde", 0xd5}, {U"Ouml", 0xd6}, {U"QUOT", 0x22}, {U"REG", 0xae},
    {U"THORN", 0xde}, {U"Uacute", 0xda}, {U"Ucirc", 0xdb}, {U"Ugrave", 0xd9}, {U"Uuml", 0xdc}, {U"Yacute", 0xdd},
    {U"aacute", 0xe1}, {U"acirc", 0xe2}, {U"acute", 0xb4}, {U"aelig", 0xe6}, {U"agrave", 0xe0}, {U"amp", 0x26},
    {U"aring", 0xe5}, {U"atilde", 0xe3}, {U"auml", 0xe4}, {U"brvbar", 0xa6}, {U"ccedil", 0xe7}, {U"cedil", 0xb8},
    {U"cent", 0xa2}, {U"copy", 0xa9}, {U"curren", 0xa4}, {U"deg", 0xb0}, {U"divide", 0xf7}, {U"eacute", 0xe9},
    {U"ecirc", 0xea}, {U"egrave", 0xe8}, {U"eth", 0xf0}, {U"euml", 0xeb}, {U"frac12", 0xbd}, {U"frac14", 0xbc},
    {U"frac34", 0xbe}, {U"gt", 0x3e}, {U"iacute", 0xed}, {U"icirc", 0xee}, {U"iexcl", 0xa1}, {U"igrave", 0xec},
    {U"iquest", 0xbf}, {U"iuml", 0xef}, {U"laquo", 0xab}, {U"lt", 0x3c}, {U"macr", 0xaf}, {U"micro", 0xb5},
    {U"middot", 0xb7}, {U"nbsp", 0xa0}, {U"not", 0xac}, {U"ntilde", 0xf1}, {U"oacute", 0xf3}, {U"ocirc", 0xf4},
    {U"ograve", 0xf2}, {U"ordf", 0xaa}, {U"ordm", 0xba}, {U"oslash", 0xf8}, {U"otilde", 0xf5}, {U"ouml", 0xf6},
    {U"para", 0xb6}, {U"plusmn", 0xb1}, {U"pound", 0xa3}, {U"quot", 0x22}, {U"raquo", 0xbb}, {U"reg", 0xae},
    {U"sect", 0xa7}, {U"shy", 0xad}, {U"sup1", 0xb9}, {U"sup2", 0xb2}, {U"sup3", 0xb3}, {U"szlig", 0xdf},
    {U"thorn", 0xfe}, {U"times", 0xd7}, {U"uacute", 0xfa}, {U"ucirc", 0xfb}, {U"ugrave", 0xf9}, {U"uml", 0xa8},
    {U"uuml", 0xfc}, {U"yacute", 0xfd}, {U"yen", 0xa5}, {U"yuml", 0xff}};
  const auto found = names.find(name);
  return found == names.end() ? std::nullopt : std::optional<char32_t>(found->second);
}

// html.unescape's numeric reference: the character of code point `value` (at most 0x110000: any larger one), or
// none (0 as the result's length) where Python drops it.
std::u32string numeric_reference(uint32_t value) {
  // _invalid_charrefs: NUL, CR and 0x80..0x9F read as windows-1252.
  static const char32_t windows_1252[32] = {
    0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039, 0x152, 0x8d, 0x17d,
    0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d,
    0x17e, 0x178};
  if (value == 0) return U"\ufffd";
  if (value == 0xd) return U"\r";
  if (value >= 0x80 && value <= 0x9f) return std::u32string(1, windows_1252[value - 0x80]);
  if ((value >= 0xd800 && value <= 0xdfff) || value > 0x10ffff) return U"\ufffd";
  const bool invalid = (value >= 0x1 && value <= 0x8) || value == 0xb || (value >= 0xe && value <= 0x1f) ||
                       value == 0x7f || (value >= 0xfdd0 && value <= 0xfdef) || (value & 0xfffe) == 0xfffe;
  return invalid ? U"" : std::u32string(1, static_cast<char32_t>(value));
}

// Python's html.unescape: every match of &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?) replaced, left to
// right. A named reference with a semicolon that is no legacy name is refused (see the top of the file).
std::u32string html_unescape(const std::u32string& text, const std::string& where) {
  std::u32string out;
  const size_t size = text.size();
  for (size_t i = 0; i < size;) {
    if (text[i] != U'&') {
      out += text[i++];
      continue;
    }
    size_t k = i + 1;
    if (k < size && text[k] == U'#') {
      const bool hex = k + 1 < size && (text[k + 1] == U'x' || text[k + 1] == U'X');
      const uint32_t base = hex ? 16 : 10;
      auto digit = [&](char32_t c) -> int {
        if (c >= U'0' && c <= U'9') return static_cast<int>(c - U'0');
        if (hex && c >= U'a' && c <= U'f') return static_cast<int>(c - U'a' + 10);
        if (hex && c >= U'A' && c <= U'F') return static_cast<int>(c - U'A' + 10);
        return -1;
      };
      const size_t first = k + (hex ? 2 : 1);
      uint32_t value = 0;
      for (k = first; k < size && digit(text[k]) >= 0; ++k)
        value = std::min<uint32_t>(value * base + static_cast<uint32_t>(digit(text[k])), 0x110000);
      if (k == first) {  // "&#" with no digits: not a reference
        out += text[i++];
        continue;
      }
      if (!hex && k - first > 4300)  // Python's int() refuses longer decimal strings: html.unescape fails
        throw Error(where + ": a character reference of " + std::to_string(k - first) + " digits; Python's "
                    "html.unescape (WanPipeline's prompt_clean) fails on more than 4300");
      if (k < size && text[k] == U';') ++k;
      out += numeric_reference(value);
      i = k;
      continue;
    }
    while (k < size && k - (i + 1) < 32 && text[k] != U'\t' && text[k] != U'\n' && text[k] != U'\f' &&
           text[k] != U' ' && text[k] != U'<' && text[k] != U'&' && text[k] != U'#' && text[k] != U';')
      ++k;
    if (k == i + 1) {  // no name
      out += text[i++];
      continue;
    }
    const std::u32string name = text.substr(i + 1, k - (i + 1));
    const bool semicolon = k < size && text[k] == U';';
    const size_t end = k + (semicolon ? 1 : 0);
    if (const auto value = legacy_entity(name)) {
      out += *value;
      i = end;
      continue;
    }
    if (semicolon && std::all_of(name.begin(), name.end(), [](char32_t c) {
          return (c >= U'0' && c <= U'9') || (c >= U'a' && c <= U'z') || (c >= U'A' && c <= U'Z');
        })) {
      std::string shown;
      for (char32_t c : name) shown += static_cast<char>(c);
      throw Error(where + ": unescaped once, the HTML reads '&" + shown + ";', an entity l2c-run does not know "
                  "(it unescapes numeric references and the legacy names, \"&amp\", \"&eacute\" and such); give the "
                  "text it stands for");
    }
    const std::u32string reference = text.substr(i + 1, end - (i + 1));  // the name and its semicolon
    size_t prefix = reference.size() > 1 ? reference.size() - 1 : 0;
    for (; prefix >= 2; --prefix)
      if (const auto value = legacy_entity(reference.substr(0, prefix))) {
        out += *value;
        out += reference.substr(prefix);
        break;
      }
    if (prefix < 2) out += U"&" + reference;
    i = end;
  }
  return out;
}

std::u32string decode_utf8(const std::string& text) {  // valid UTF-8 (refused_prompt checked it)
  std::u32string out;
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    const size_t length = byte < 0x80 ? 1 : byte < 0xe0 ? 2 : byte < 0xf0 ? 3 : 4;
    char32_t code = length == 1 ? byte : byte & (0x3f >> (length - 1));
    for (size_t k = 1; k < length && i + k < text.size(); ++k) code = (code << 6) | (text[i + k] & 0x3f);
    out += code;
    i += length;
  }
  return out;
}

std::string encode_utf8(const std::u32string& text) {
  std::string out;
  for (char32_t c : text) {
    if (c < 0x80) {
      out += static_cast<char>(c);
    } else if (c < 0x800) {
      out += static_cast<char>(0xc0 | (c >> 6));
      out += static_cast<char>(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
      out += static_cast<char>(0xe0 | (c >> 12));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (c & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (c >> 18));
      out += static_cast<char>(0x80 | ((c >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (c & 0x3f));
    }
  }
  return out;
}

std::u32string strip(const std::u32string& text) {
  size_t first = 0, last = text.size();
  while (first < last && python_space(text[first])) ++first;
  while (last > first && python_space(text[last - 1])) --last;
  return text.substr(first, last - first);
}

// core/text_stack.py wan_prompt_clean without ftfy.
std::string wan_prompt_clean(const std::string& text, const std::string& where) {
  // The first character ftfy could change (all but printable ASCII, tabs and line breaks), else the first HTML
  // entity (&#?\w+;: ftfy unescapes once more than the pipeline), named as Python names them.
  std::string what;
  size_t character = 0;
  for (size_t i = 0; i < text.size() && what.empty(); ++character) {
    const auto byte = static_cast<unsigned char>(text[i]);
    const size_t length = byte < 0x80 ? 1 : byte < 0xe0 ? 2 : byte < 0xf0 ? 3 : 4;
    if (byte == '\t' || byte == '\n' || byte == '\r' || (byte >= 0x20 && byte <= 0x7e)) {
      ++i;
      continue;
    }
    const char32_t code = decode_utf8(text.substr(i, length))[0];
    // Python's repr escapes what does not print: controls, whitespace, invisible format characters, private use
    const bool invisible = code < 0x20 || (code >= 0x7f && code <= 0xa0) || code == 0xad || python_space(code) ||
                           (code >= 0x200b && code <= 0x200f) || (code >= 0x2028 && code <= 0x202e) ||
                           (code >= 0x2060 && code <= 0x206f) || code == 0xfeff || (code >= 0xe000 && code <= 0xf8ff);
    char escaped[16], code_point[16];
    std::snprintf(escaped, sizeof escaped, code <= 0xff ? "\\x%02x" : code <= 0xffff ? "\\u%04x" : "\\U%08x",
                  static_cast<unsigned>(code));
    std::snprintf(code_point, sizeof code_point, " (U+%04X)", static_cast<unsigned>(code));
    what = "'" + (invisible ? std::string(escaped) : text.substr(i, length)) + "'" + code_point +
           " at character " + std::to_string(character + 1);
  }
  auto word = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  };
  for (size_t i = text.find('&'); what.empty() && i != std::string::npos; i = text.find('&', i + 1)) {
    size_t k = i + 1 + (i + 1 < text.size() && text[i + 1] == '#' ? 1 : 0), first = k;
    while (k < text.size() && word(text[k])) ++k;
    if (k > first && k < text.size() && text[k] == ';') what = "the HTML entity '" + text.substr(i, k + 1 - i) + "'";
  }
  if (!what.empty())
    throw Error(where + ": " + what + "; WanPipeline cleans prompts with ftfy.fix_text, which l2c-run does not "
                "run: give printable ASCII without HTML entities (or --conditioning cond.npz encoded where ftfy is "
                "installed)");
  const std::u32string unescaped = strip(html_unescape(html_unescape(decode_utf8(text), where), where));
  std::u32string collapsed;
  for (size_t i = 0; i < unescaped.size();) {
    if (!python_space(unescaped[i]) || (unescaped[i] >= 0x1c && unescaped[i] <= 0x1f)) {
      collapsed += unescaped[i++];
      continue;
    }
    collapsed += U' ';
    while (i < unescaped.size() && python_space(unescaped[i]) && !(unescaped[i] >= 0x1c && unescaped[i] <= 0x1f)) ++i;
  }
  return encode_utf8(strip(collapsed));
}

}  // namespace

std::string preprocess_prompt(const std::string& text, const std::string& kind, const std::string& where) {
  if (kind == "wan_prompt_clean") return wan_prompt_clean(text, where);
  if (kind != "lower_strip") return text;
  std::u32string lowered;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte >= 0x80)
      throw Error(where + ": non-ASCII text (byte " + std::to_string(i) + "); this build lower-cases prompts "
                  "(PixArt), which the C++ runtime does for ASCII text only");
    lowered += static_cast<char32_t>(byte >= 'A' && byte <= 'Z' ? byte - 'A' + 'a' : byte);
  }
  return encode_utf8(strip(lowered));
}

}  // namespace l2c::detail
