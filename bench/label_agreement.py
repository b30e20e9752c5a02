"""Agreement of labels derived from follow-up imaging with the truth of generated pairs.

``python -m bench.label_agreement [N]``: N seeds x 3 kinds (HT persisting, contrast
cleared, haematoma expansion; ``pipelines.followup.pairs``), each pair labelled by
``pipelines.followup.derive.derive_labels``; prints the agreement per label as a
Markdown table (target >= 95 %).
"""

from __future__ import annotations

import sys
import time

from pipelines.followup.derive import derive_labels
from pipelines.followup.pairs import KINDS, generate_pair
from pipelines.volume import load_datasets

LABELS = ("ht_persists", "contrast_cleared", "expansion_planimetric", "expansion_abc2")


def main(n_seeds: int) -> int:
    """Label ``n_seeds`` x 3 pairs and print the agreement table."""
    agree = dict.fromkeys(LABELS, 0)
    total = 0
    started = time.perf_counter()
    for seed in range(n_seeds):
        for kind in KINDS:
            pair = generate_pair(seed, kind)
            derived = derive_labels(load_datasets(pair.baseline), load_datasets(pair.followup))
            total += 1
            for label in LABELS:
                agree[label] += getattr(derived, label) == getattr(pair.truth, label)
    lines = ["| Label | Agreement | Pairs |", "|---|---:|---:|"]
    lines += [f"| {label} | {agree[label] / total:.1%} | {total} |" for label in LABELS]
    lines.append(f"\n{total} pairs in {time.perf_counter() - started:.0f} s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
