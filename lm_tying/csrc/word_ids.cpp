// Words to ids in order of first appearance, for encoding the corpus (lm_tying/data/vocab.py, encode_corpus).
//
// The same result as Python's bytes.split() and a dict giving each new word the next id, at a fraction of the
// time (text8's 17M words: ~3 s in Python): an open-addressing hash table of the words, kept in one byte
// arena, so that lookups touch one slot and one arena run each. The caller feeds the corpus chunk by chunk
// (each cut between words) and reads the distinct words back at the end, in id order.

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// ASCII whitespace as bytes.split() counts it: space, \t, \n, \v, \f, \r.
inline bool is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

// FNV-1a: short words, a few bytes each; the table's slots are found from its bits.
inline uint64_t hash_word(const char* w, int64_t n) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < n; ++i) h = (h ^ static_cast<unsigned char>(w[i])) * 1099511628211ull;
  return h ^ (h >> 29);
}

struct WordIds {
  std::vector<char> arena;     // the distinct words, one after another, in id order
  std::vector<int64_t> start;  // word id's first byte in the arena; start[count] is the arena's end
  std::vector<int32_t> slots;  // -1 or a word id, at the word's hash position (linear probing)
  uint64_t mask = 0;

  WordIds() : start{0}, slots(1 << 16, -1), mask((1 << 16) - 1) {}

  int64_t count() const { return static_cast<int64_t>(start.size()) - 1; }

  bool same(int32_t id, const char* w, int64_t n) const {
    return start[id + 1] - start[id] == n && std::memcmp(arena.data() + start[id], w, n) == 0;
  }

  int32_t id(const char* w, int64_t n) {
    uint64_t at = hash_word(w, n) & mask;
    while (slots[at] >= 0) {
      if (same(slots[at], w, n)) return slots[at];
      at = (at + 1) & mask;
    }
    const int32_t fresh = static_cast<int32_t>(count());
    slots[at] = fresh;
    arena.insert(arena.end(), w, w + n);
    start.push_back(static_cast<int64_t>(arena.size()));
    if (2 * static_cast<uint64_t>(count()) > mask) grow();  // at most half full: probes stay short
    return fresh;
  }

  void grow() {
    mask = 2 * mask + 1;
    slots.assign(mask + 1, -1);
    for (int32_t i = 0; i < count(); ++i) {
      uint64_t at = hash_word(arena.data() + start[i], start[i + 1] - start[i]) & mask;
      while (slots[at] >= 0) at = (at + 1) & mask;
      slots[at] = i;
    }
  }
};

}  // namespace

extern "C" void* word_ids_new() { return new WordIds(); }

extern "C" void word_ids_free(void* table) { delete static_cast<WordIds*>(table); }

// Writes the ids of text's words (split at ASCII whitespace) to out, which holds at least len / 2 + 1 ids (the
// most words len bytes can hold); returns how many, or -1 when the table would pass 2^31 - 1 words.
extern "C" int64_t word_ids_feed(void* table, const char* text, int64_t len, int32_t* out) {
  WordIds& t = *static_cast<WordIds*>(table);
  int64_t written = 0, i = 0;
  while (i < len) {
    while (i < len && is_space(static_cast<unsigned char>(text[i]))) ++i;
    const int64_t begin = i;
    while (i < len && !is_space(static_cast<unsigned char>(text[i]))) ++i;
    if (i == begin) break;
    if (t.count() == INT32_MAX) return -1;
    out[written++] = t.id(text + begin, i - begin);
  }
  return written;
}

// How many distinct words the table holds, and their bytes together.
extern "C" int64_t word_ids_count(void* table) { return static_cast<WordIds*>(table)->count(); }
extern "C" int64_t word_ids_bytes(void* table) {
  return static_cast<int64_t>(static_cast<WordIds*>(table)->arena.size());
}

// Copies the words, in id order, to words (word_ids_bytes bytes) and their starts to starts (count + 1 offsets).
extern "C" void word_ids_words(void* table, char* words, int64_t* starts) {
  const WordIds& t = *static_cast<WordIds*>(table);
  std::memcpy(words, t.arena.data(), t.arena.size());
  std::memcpy(starts, t.start.data(), t.start.size() * sizeof(int64_t));
}
