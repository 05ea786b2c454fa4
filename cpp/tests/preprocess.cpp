// l2c-preprocess-test KIND: each line on stdin is a JSON string (so a text may hold any character); for each, prints
// one line: the text as the runtime's prompt preprocessing KIND (src/preprocessing.hpp: none, lower_strip,
// wan_prompt_clean) rewrites it, as a JSON string, or "refused: ..." where it refuses it. tests/test_wan_prompts.py
// compares them with l2c_export/core/text_stack.py's.
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "../src/preprocessing.hpp"
#include "l2c/error.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " KIND < lines of JSON strings\n";
    return 2;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    const std::string text = nlohmann::json::parse(line).get<std::string>();
    try {
      std::cout << nlohmann::json(l2c::detail::preprocess_prompt(text, argv[1], "prompt")).dump() << std::endl;
    } catch (const l2c::Error& error) {
      std::cout << "refused: " << error.what() << std::endl;
    }
  }
  return 0;
}
