// A build's tokenizer (a Hugging Face tokenizer.json) as the Python runtime sets it up with the `tokenizers` library
// (l2c_export/runtime/components.py StackEncoder: special tokens added, truncated and right-padded to max_length).
// Internal to the library.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace l2c::detail {

class Tokenizer {
 public:
  // `file`: the build's tokenizer.json (its sha256 already checked); `where` names it in errors. `library`: the
  // tokenizer library to load (empty: $L2C_TOKENIZER_LIBRARY, else the one `make cpp` fetched). l2c::Error for a
  // tokenizer kind the library does not read as `tokenizers` does; l2c::UnavailableError where the library is
  // missing. A WordLevel tokenizer (Lowercase normalizer or none; Whitespace or WhitespaceSplit pre-tokenizer) is read
  // by the runtime itself: no library.
  Tokenizer(const std::filesystem::path& file, const std::string& where, int64_t pad_id, int64_t max_length,
            const std::string& library = "");
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // `text` (UTF-8, already checked and preprocessed) -> `ids` and `mask` (max_length each, appended): the special
  // tokens of the tokenizer's post-processor around the text's tokens, cut to max_length, padded with pad_id under
  // mask 0. Not thread-safe (the library's API is not).
  void encode(const std::string& text, std::vector<int64_t>& ids, std::vector<int64_t>& mask) const;

  // Why the library would read `text` (valid UTF-8) otherwise than `tokenizers` does, or "" where it reads it the
  // same: a control character (tab, newline), whitespace other than the space (the no-break space and the like), a
  // combining mark (U+0300..U+036F: `tokenizers` composes it first, NFC), or a special token's text ("</s>"); for a
  // WordLevel tokenizer, any character past ASCII.
  std::string refusal(const std::string& text) const;

  const std::string& kind() const { return kind_; }  // "unigram (T5)", "bpe (CLIP)" or "word-level"

 private:
  struct Handle;
  std::unique_ptr<Handle> handle_;
  std::string where_, kind_;
  int64_t pad_id_ = 0, max_length_ = 0, unk_id_ = -1;
  std::vector<int64_t> prefix_, suffix_;  // the post-processor's special tokens before and after the text's
  std::vector<std::string> specials_;     // the added tokens' texts, which `tokenizers` matches in the text
  // WordLevel: its words and ids (empty for the library's kinds), whether the normalizer lower-cases, whether the
  // pre-tokenizer is Whitespace (punctuation split from words) rather than WhitespaceSplit.
  std::unordered_map<std::string, int64_t> words_;
  bool lowercase_ = false, split_punctuation_ = false;

  void read_word_level(const nlohmann::json& data, const std::string& where);
  void word_level_tokens(const std::string& text, std::vector<int64_t>& tokens, size_t room) const;
};

// The default tokenizer library: $L2C_TOKENIZER_LIBRARY, else the path `make cpp` compiled in.
std::string default_tokenizer_library();

}  // namespace l2c::detail
