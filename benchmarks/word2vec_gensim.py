"""gensim's word2vec as a user runs it, for ``benchmarks/word2vec.py --parts whole``: one process that reads
text8, trains skip-gram with negative sampling and evaluates the vectors, so its wall time compares with the
whole ``lm-tying fit --config configs/word2vec.yaml`` command.

    python benchmarks/word2vec_gensim.py --corpus ../shared/data/text8-head.zip --seed 0

The corpus (plain text8 or a zip holding ``text8``) is cut into 10,000-word sentences as gensim's
``Text8Corpus`` does; ``--train-fraction`` keeps the first part of it, as ``configs/word2vec.yaml``'s split
trains on the first 90 %. The other settings are the config's (dimension 128, window 5, 5 negatives per
pair, sample 1e-3, min_count 5, vocabulary cap 50,000, 5 epochs, gensim's default learning rate 0.025), with
one worker per core. Prints the Google analogy accuracy and the WordSim-353 / SimLex-999 Spearman
correlations (gensim's own evaluators and files), then one JSON line with them and the phase times.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zipfile
from pathlib import Path

START = time.perf_counter()

from gensim.models import Word2Vec  # noqa: E402
from gensim.test.utils import datapath  # noqa: E402


def read_words(corpus: str) -> list[str]:
    if zipfile.is_zipfile(corpus):
        with zipfile.ZipFile(corpus) as archive:
            return archive.read("text8").decode().split()
    return Path(corpus).read_text().split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args()
    imported = time.perf_counter()
    words = read_words(args.corpus)
    words = words[: int(len(words) * args.train_fraction)]
    sentences = [words[i : i + 10_000] for i in range(0, len(words), 10_000)]
    read = time.perf_counter()
    model = Word2Vec(
        sentences, vector_size=128, window=5, negative=5, sample=1e-3, min_count=5, max_final_vocab=50_000,
        epochs=args.epochs, alpha=0.025, min_alpha=0.025 * 1e-4, workers=args.workers, sg=1, hs=0, seed=args.seed,
    )  # fmt: skip
    trained = time.perf_counter()
    analogy = model.wv.evaluate_word_analogies(datapath("questions-words.txt"))[0]
    wordsim = model.wv.evaluate_word_pairs(datapath("wordsim353.tsv"))[1][0]
    simlex = model.wv.evaluate_word_pairs(datapath("simlex999.txt"))[1][0]
    done = time.perf_counter()
    print(f"analogy {100 * analogy:.2f} %, WordSim-353 {wordsim:.3f}, SimLex-999 {simlex:.3f}")
    print(json.dumps(dict(
        analogy=analogy, wordsim353=float(wordsim), simlex999=float(simlex), vocab=len(model.wv),
        import_s=imported - START, read_s=read - imported, train_s=trained - read, evaluate_s=done - trained,
    )))  # fmt: skip


if __name__ == "__main__":
    main()
