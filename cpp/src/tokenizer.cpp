// The tokenizer: onnxruntime-extensions' (ortx), which reads a Hugging Face tokenizer.json, through the C API of the
// library that carries it outside Python: onnxruntime-genai's libonnxruntime-genai.so (the onnxruntime-genai-core
// wheel; `make cpp` fetches it, cpp/scripts/fetch-tokenizer-library.sh), dlopen'ed as ONNX Runtime is. The library
// tokenizes the text (normalizer, pre-tokenizer, model); what `tokenizers` does around that as the Python runtime
// sets it up, the runtime does from the file's own records: the post-processor's special tokens (TemplateProcessing,
// or RobertaProcessing / BertProcessing), truncation to max_length and right padding with the pad token.
//
// A WordLevel model (a vocabulary of whole words, as the t2i-digits demo's) is the exception: the library reads only
// Unigram and BPE models, and neither can be given a file that reads as a WordLevel one does (WordLevel turns any
// word outside its vocabulary into one unknown token, where a Unigram or BPE model splits it into the known pieces
// it holds: "sevens" is [<unk>] to WordLevel, [seven, <unk>] to a Unigram over the same words). Its algorithm is a
// lookup: the runtime does it (word_level_tokens), for ASCII text, tested against `tokenizers` in tests/test_cpp.py.
#include "tokenizer.hpp"

#include <dlfcn.h>
#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "l2c/error.hpp"

namespace l2c::detail {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// onnxruntime-genai's C API (ort_genai_c.h), the functions used here.
struct OgaResult;
struct OgaTokenizer;
struct OgaSequences;
struct OgaApi {
  OgaResult* (*create_tokenizer_from_path)(const char*, OgaTokenizer**);
  void (*destroy_tokenizer)(OgaTokenizer*);
  OgaResult* (*update_tokenizer_options)(OgaTokenizer*, const char* const*, const char* const*, size_t);
  OgaResult* (*create_sequences)(OgaSequences**);
  void (*destroy_sequences)(OgaSequences*);
  OgaResult* (*encode)(const OgaTokenizer*, const char*, OgaSequences*);
  size_t (*sequence_count)(const OgaSequences*, size_t);
  const int32_t* (*sequence_data)(const OgaSequences*, size_t);
  const char* (*result_error)(const OgaResult*);
  void (*destroy_result)(OgaResult*);
};

std::mutex api_mutex;  // loading the library, and every call into it (its API is not thread-safe)
OgaApi* api_instance = nullptr;

OgaApi& oga_api(const std::string& requested) {
  if (api_instance != nullptr) return *api_instance;
  const std::string path = requested.empty() ? default_tokenizer_library() : requested;
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr)
    throw UnavailableError("cannot load the tokenizer library from " + path + " (" + dlerror() + "); `make cpp` "
                           "fetches it (onnxruntime-genai-core's libonnxruntime-genai.so), or point "
                           "L2C_TOKENIZER_LIBRARY at it");
  auto symbol = [&](const char* name) {
    void* found = dlsym(handle, name);
    if (found == nullptr) throw UnavailableError(path + ": has no " + name + "; not onnxruntime-genai's library");
    return found;
  };
  auto* api = new OgaApi;
  api->create_tokenizer_from_path = reinterpret_cast<decltype(api->create_tokenizer_from_path)>(
      symbol("OgaCreateTokenizerFromPath"));
  api->destroy_tokenizer = reinterpret_cast<decltype(api->destroy_tokenizer)>(symbol("OgaDestroyTokenizer"));
  api->update_tokenizer_options = reinterpret_cast<decltype(api->update_tokenizer_options)>(
      symbol("OgaUpdateTokenizerOptions"));
  api->create_sequences = reinterpret_cast<decltype(api->create_sequences)>(symbol("OgaCreateSequences"));
  api->destroy_sequences = reinterpret_cast<decltype(api->destroy_sequences)>(symbol("OgaDestroySequences"));
  api->encode = reinterpret_cast<decltype(api->encode)>(symbol("OgaTokenizerEncode"));
  api->sequence_count = reinterpret_cast<decltype(api->sequence_count)>(symbol("OgaSequencesGetSequenceCount"));
  api->sequence_data = reinterpret_cast<decltype(api->sequence_data)>(symbol("OgaSequencesGetSequenceData"));
  api->result_error = reinterpret_cast<decltype(api->result_error)>(symbol("OgaResultGetError"));
  api->destroy_result = reinterpret_cast<decltype(api->destroy_result)>(symbol("OgaDestroyResult"));
  api_instance = api;
  return *api;
}

// An OgaResult (an error) as an l2c::Error naming `where`; none: nothing.
void check(OgaApi& api, OgaResult* result, const std::string& where) {
  if (result == nullptr) return;
  const std::string message = api.result_error(result);
  api.destroy_result(result);
  throw Error(where + ": " + message);
}

json read_json(const fs::path& file, const std::string& where) {
  std::ifstream in(file);
  if (!in) throw Error(where + ": cannot be read");
  try {
    return json::parse(in);
  } catch (const json::parse_error& error) {
    throw Error(where + ": not valid JSON (" + error.what() + ")");
  }
}

int64_t token_id(const json& value, const std::string& where, const std::string& field) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > INT32_MAX)
    throw Error(where + ": field '" + field + "' is " + value.dump() + "; expected a token id");
  return value.get<int64_t>();
}

void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::binary);
  out << text;
  if (!out) throw FileSystemError(file.string() + ": cannot be written");
}

// Rust's `\s` (the `tokenizers` pre-tokenizers' regex) on ASCII: the space, tab, newline, vertical tab, form feed and
// carriage return.
bool ascii_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
bool ascii_word(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

}  // namespace

std::string default_tokenizer_library() {
  if (const char* from_env = std::getenv("L2C_TOKENIZER_LIBRARY"); from_env && *from_env) return from_env;
#ifdef L2C_DEFAULT_TOKENIZER_LIBRARY
  if (fs::exists(L2C_DEFAULT_TOKENIZER_LIBRARY)) return L2C_DEFAULT_TOKENIZER_LIBRARY;
#endif
  return "libonnxruntime-genai.so";
}

struct Tokenizer::Handle {
  OgaApi* api = nullptr;
  OgaTokenizer* tokenizer = nullptr;
};

Tokenizer::Tokenizer(const fs::path& file, const std::string& where, int64_t pad_id, int64_t max_length,
                     const std::string& library)
    : handle_(std::make_unique<Handle>()), where_(where), pad_id_(pad_id), max_length_(max_length) {
  const json data = read_json(file, where);
  if (!data.is_object() || !data.contains("model") || !data["model"].is_object())
    throw Error(where + ": field 'model' is missing; expected a tokenizers library file");
  const json& model = data["model"];
  const std::string type = model.value("type", "");
  // The library picks its algorithm by the transformers class (tokenizer_config.json); the model kinds it reads
  // as `tokenizers` does are T5's Unigram and CLIP's BPE (with its "</w>" word ends).
  std::string tokenizer_class;
  if (type == "Unigram") {
    tokenizer_class = "T5Tokenizer", kind_ = "unigram (T5)";
    if (model.contains("unk_id") && !model["unk_id"].is_null())
      unk_id_ = token_id(model["unk_id"], where, "model/unk_id");
  } else if (type == "BPE" && model.value("end_of_word_suffix", json()).is_string() &&
             model["end_of_word_suffix"] == "</w>") {
    tokenizer_class = "CLIPTokenizer", kind_ = "bpe (CLIP)";
    if (model.contains("unk_token") && model["unk_token"].is_string() && model.contains("vocab") &&
        model["vocab"].contains(model["unk_token"].get<std::string>()))
      unk_id_ = token_id(model["vocab"][model["unk_token"].get<std::string>()], where, "model/vocab");
  } else if (type == "WordLevel") {
    kind_ = "word-level";
    read_word_level(data, where);
  } else {
    throw Error(where + ": field 'model/type' is " + (type.empty() ? std::string("missing") : type) +
                (type == "BPE" ? " without CLIP's \"</w>\" word ends" : "") +
                "; the C++ tokenizer reads T5's Unigram and CLIP's BPE tokenizers (onnxruntime-extensions') and "
                "WordLevel ones; give --conditioning cond.npz (the encoded prompts) for this build");
  }
  for (const json& added : data.value("added_tokens", json::array()))
    // One character (SD3's CLIP-G pads with "!", an added token): read alike by the library, as tests/test_cpp.py
    // checks; a WordLevel model's words would be cut at it ("!!" is two of it), so refused there.
    if (added.is_object() && added.value("content", json()).is_string() &&
        (added["content"].get<std::string>().size() > 1 || type == "WordLevel"))
      specials_.push_back(added["content"].get<std::string>());
  // The post-processor's special tokens around the text's (as `tokenizers` adds them with add_special_tokens).
  const json post = data.value("post_processor", json());
  const std::string post_type = post.is_object() ? post.value("type", "") : "";
  if (post_type == "TemplateProcessing") {
    bool after = false;
    for (const json& piece : post.value("single", json::array())) {
      if (piece.contains("Sequence")) {
        after = true;
        continue;
      }
      const std::string name = piece.contains("SpecialToken") ? piece["SpecialToken"].value("id", "") : "";
      const json& special = post.value("special_tokens", json::object());
      if (!special.contains(name) || !special[name].contains("ids") || !special[name]["ids"].is_array())
        throw Error(where + ": field 'post_processor/single' names " + name + ", which 'special_tokens' lacks");
      for (const json& id : special[name]["ids"])
        (after ? suffix_ : prefix_).push_back(token_id(id, where, "post_processor/special_tokens"));
    }
  } else if (post_type == "RobertaProcessing" || post_type == "BertProcessing") {
    prefix_.push_back(token_id(post.value("cls", json::array({"", nullptr})).at(1), where, "post_processor/cls"));
    suffix_.push_back(token_id(post.value("sep", json::array({"", nullptr})).at(1), where, "post_processor/sep"));
  } else if (!post.is_null()) {
    throw Error(where + ": field 'post_processor/type' is " + post_type + "; expected TemplateProcessing, "
                "RobertaProcessing, BertProcessing or none");
  }
  if (static_cast<int64_t>(prefix_.size() + suffix_.size()) >= max_length_)
    throw Error(where + ": its special tokens leave no room for text in " + std::to_string(max_length_) + " tokens");
  if (!words_.empty()) return;  // WordLevel: no library

  // The library reads a folder (tokenizer.json, tokenizer_config.json and onnxruntime-genai's genai_config.json):
  // one is made for it in the temporary directory and removed once the tokenizer is made.
  std::string pattern = (fs::temp_directory_path() / "l2c-tokenizer-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr)
    throw FileSystemError(pattern + ": cannot make a temporary folder for the tokenizer");
  const fs::path folder = pattern;
  std::lock_guard<std::mutex> lock(api_mutex);
  try {
    std::ifstream in(file, std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    write_text(folder / "tokenizer.json", bytes.str());
    write_text(folder / "tokenizer_config.json", json{{"tokenizer_class", tokenizer_class}}.dump());
    write_text(folder / "genai_config.json",
               json{{"model", {{"type", "l2c-tokenizer"}, {"context_length", max_length_}}}}.dump());
    OgaApi& api = oga_api(library);
    handle_->api = &api;
    check(api, api.create_tokenizer_from_path(folder.c_str(), &handle_->tokenizer), where);
    const char* keys[] = {"add_special_tokens"};
    const char* values[] = {"false"};
    check(api, api.update_tokenizer_options(handle_->tokenizer, keys, values, 1), where);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(folder, ignored);
    throw;
  }
  std::error_code ignored;
  fs::remove_all(folder, ignored);
}

std::string Tokenizer::refusal(const std::string& text) const {
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    const size_t length = byte < 0x80 ? 1 : byte < 0xe0 ? 2 : byte < 0xf0 ? 3 : 4;
    uint32_t code = length == 1 ? byte : byte & (0x3f >> (length - 1));
    for (size_t k = 1; k < length && i + k < text.size(); ++k) code = (code << 6) | (text[i + k] & 0x3f);
    char at[48];
    std::snprintf(at, sizeof at, " (U+%04X at byte %zu)", code, i);
    if (code < 0x20 || (code >= 0x7f && code < 0xa0))
      return std::string("a control character") + at + ", such as a tab or a newline; the C++ tokenizer reads "
             "prompts of printable text (use spaces)";
    if (code == 0xa0 || code == 0x1680 || (code >= 0x2000 && code <= 0x200a) || code == 0x2028 || code == 0x2029 ||
        code == 0x202f || code == 0x205f || code == 0x3000)
      return std::string("whitespace other than the space") + at + "; the C++ tokenizer splits on spaces only (use "
             "spaces)";
    if (code >= 0x300 && code <= 0x36f)
      return std::string("a combining mark") + at + "; the C++ tokenizer does not compose it with its letter (write "
             "the accented letter as one character)";
    if (code >= 0x80 && !words_.empty())
      return std::string("non-ASCII text") + at + "; the C++ runtime reads the prompts of " + where_ + " (a "
             "WordLevel tokenizer) in ASCII";
    i += length;
  }
  if (words_.empty() && !text.empty() && text.find_first_not_of(' ') == std::string::npos)
    return "only spaces; the C++ tokenizer reads them otherwise (give \"\" or some text)";
  for (const std::string& special : specials_)
    if (text.find(special) != std::string::npos)
      return "the special token " + special + " of " + where_ + " written as text; the C++ tokenizer reads it as "
             "text, not as the token";
  return "";
}

Tokenizer::~Tokenizer() {
  if (handle_ && handle_->tokenizer != nullptr) {
    std::lock_guard<std::mutex> lock(api_mutex);
    handle_->api->destroy_tokenizer(handle_->tokenizer);
  }
}

void Tokenizer::encode(const std::string& text, std::vector<int64_t>& ids, std::vector<int64_t>& mask) const {
  std::vector<int64_t> tokens(prefix_);
  const size_t room = static_cast<size_t>(max_length_) - prefix_.size() - suffix_.size();  // truncation
  if (!words_.empty()) {
    word_level_tokens(text, tokens, room);
  } else if (!text.empty()) {  // the library gives an empty text tokens of its own; `tokenizers` gives it none
    OgaApi& api = *handle_->api;
    std::lock_guard<std::mutex> lock(api_mutex);
    OgaSequences* sequences = nullptr;
    check(api, api.create_sequences(&sequences), where_);
    std::unique_ptr<OgaSequences, void (*)(OgaSequences*)> owned(sequences, api.destroy_sequences);
    check(api, api.encode(handle_->tokenizer, text.c_str(), sequences), where_);
    const size_t count = api.sequence_count(sequences, 0);
    const int32_t* data = api.sequence_data(sequences, 0);
    for (size_t i = 0; i < count && i < room; ++i) {
      // A piece missing from the vocabulary: the library marks it -1, `tokenizers` gives the unknown token.
      if (data[i] < 0 && unk_id_ < 0)
        throw Error(where_ + ": the text has a piece its vocabulary lacks, and the tokenizer has no unknown token");
      tokens.push_back(data[i] < 0 ? unk_id_ : data[i]);
    }
  }
  tokens.insert(tokens.end(), suffix_.begin(), suffix_.end());
  for (int64_t i = 0; i < max_length_; ++i) {
    const bool token = i < static_cast<int64_t>(tokens.size());
    ids.push_back(token ? tokens[i] : pad_id_);
    mask.push_back(token ? 1 : 0);
  }
}

void Tokenizer::read_word_level(const json& data, const std::string& where) {
  const json& model = data["model"];
  if (!model.value("vocab", json()).is_object() || model["vocab"].empty())
    throw Error(where + ": field 'model/vocab' is missing; expected the WordLevel model's words and their ids");
  for (const auto& [word, id] : model["vocab"].items()) words_[word] = token_id(id, where, "model/vocab/" + word);
  if (model.value("unk_token", json()).is_string() && words_.count(model["unk_token"].get<std::string>()))
    unk_id_ = words_.at(model["unk_token"].get<std::string>());
  const json normalizer = data.value("normalizer", json());
  const std::string normalizer_type = normalizer.is_object() ? normalizer.value("type", "") : "";
  if (!normalizer.is_null() && normalizer_type != "Lowercase")
    throw Error(where + ": field 'normalizer/type' is " + (normalizer_type.empty() ? "missing" : normalizer_type) +
                "; the C++ runtime reads WordLevel tokenizers with a Lowercase normalizer or none; give "
                "--conditioning cond.npz (the encoded prompts) for this build");
  lowercase_ = normalizer_type == "Lowercase";
  const json pre = data.value("pre_tokenizer", json());
  const std::string pre_type = pre.is_object() ? pre.value("type", "") : "";
  if (pre_type != "Whitespace" && pre_type != "WhitespaceSplit")
    throw Error(where + ": field 'pre_tokenizer/type' is " + (pre_type.empty() ? "missing" : pre_type) +
                "; the C++ runtime reads WordLevel tokenizers split by Whitespace or WhitespaceSplit; give "
                "--conditioning cond.npz (the encoded prompts) for this build");
  split_punctuation_ = pre_type == "Whitespace";
}

// WordLevel as `tokenizers` reads an ASCII text (refusal() holds back the rest): lower-cased where the normalizer
// says so, cut into words by the pre-tokenizer (Whitespace, the regex \w+|[^\w\s]+: runs of word characters and runs
// of other characters that are not spaces; WhitespaceSplit: runs of characters that are not spaces), each word its
// id in the vocabulary, else the unknown token; at most `room` of them appended to `tokens`.
void Tokenizer::word_level_tokens(const std::string& text, std::vector<int64_t>& tokens, size_t room) const {
  size_t added = 0;
  for (size_t i = 0; i < text.size() && added < room;) {
    if (ascii_space(text[i])) {
      ++i;
      continue;
    }
    const bool word = ascii_word(text[i]);
    size_t end = i + 1;
    while (end < text.size() && !ascii_space(text[end]) && (!split_punctuation_ || ascii_word(text[end]) == word))
      ++end;
    std::string piece = text.substr(i, end - i);
    if (lowercase_)
      std::transform(piece.begin(), piece.end(), piece.begin(),
                     [](char c) { return static_cast<char>(std::tolower(static_cast<unsigned char>(c))); });
    const auto found = words_.find(piece);
    if (found == words_.end() && unk_id_ < 0)
      throw Error(where_ + ": the text has a word its vocabulary lacks, and the tokenizer has no unknown token");
    tokens.push_back(found == words_.end() ? unk_id_ : found->second);
    ++added;
    i = end;
  }
}

}  // namespace l2c::detail
