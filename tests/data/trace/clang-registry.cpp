// A C++ translation unit whose static initialiser outweighs its own functions in the optimiser:
// many namespace-scope objects with dynamic initialisation, all folded into _GLOBAL__sub_I_registry.cpp.
#include <map>
#include <string>
#include <vector>

namespace {
struct Entry {
  std::string name;
  std::vector<int> values;
  Entry(const char* n, int k) : name(n) { for (int i = 0; i < k; ++i) values.push_back(i * k); }
};
std::map<std::string, int> table = {{"a", 1}, {"b", 2}, {"c", 3}};
Entry e1("one", 1), e2("two", 2), e3("three", 3), e4("four", 4), e5("five", 5), e6("six", 6);
Entry e7("seven", 7), e8("eight", 8), e9("nine", 9), e10("ten", 10), e11("eleven", 11), e12("twelve", 12);
std::vector<std::string> names = {"x", "y", "z"};
}  // namespace

int lookup(const std::string& k) { auto it = table.find(k); return it == table.end() ? -1 : it->second; }
