// l2c-tokenize-test TOKENIZER_JSON PAD_ID MAX_LENGTH: each line on stdin is a JSON string (so a text may hold any
// character); for each, prints one line: the ids the runtime's tokenizer (src/tokenizer.hpp) gives it, as a JSON
// array of MAX_LENGTH ids then the mask's count of ones. tests/test_cpp.py compares them with the `tokenizers`
// library's, set up as the Python runtime sets it up. A text the tokenizer refuses (Tokenizer::refusal) prints
// "refused: ...", one it fails on "error: ...".
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "../src/tokenizer.hpp"
#include "l2c/error.hpp"
#include "l2c/pipeline.hpp"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " TOKENIZER_JSON PAD_ID MAX_LENGTH < lines of JSON strings\n";
    return 2;
  }
  try {
    l2c::init_onnxruntime();  // the tokenizer library uses the ONNX Runtime already loaded
    const l2c::detail::Tokenizer tokenizer(argv[1], argv[1], std::stoll(argv[2]), std::stoll(argv[3]));
    std::string line;
    while (std::getline(std::cin, line)) {
      std::vector<int64_t> ids, mask;
      const std::string text = nlohmann::json::parse(line).get<std::string>();
      if (const std::string refused = tokenizer.refusal(text); !refused.empty()) {
        std::cout << "refused: " << refused << std::endl;
        continue;
      }
      try {
        tokenizer.encode(text, ids, mask);
      } catch (const l2c::Error& error) {
        std::cout << "error: " << error.what() << std::endl;
        continue;
      }
      int64_t ones = 0;
      for (int64_t m : mask) ones += m;
      std::cout << nlohmann::json(ids).dump() << " " << ones << std::endl;
    }
  } catch (const l2c::Error& error) {
    std::cerr << "error: " << error.what() << std::endl;
    return 2;
  }
  return 0;
}
