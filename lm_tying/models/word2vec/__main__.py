"""``python -m lm_tying.models.word2vec``: build (or find) word2vec's compiled code and say how long it took."""

import time

from lm_tying import native

start = time.perf_counter()
found = native.library() is not None
print(f"word2vec's compiled code {'ready' if found else 'NOT built'} after {time.perf_counter() - start:.1f} s")
raise SystemExit(0 if found else 1)
