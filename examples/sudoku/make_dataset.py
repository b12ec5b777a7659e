#!/usr/bin/env python3
"""Generate a small unique-solution Sudoku dataset in the upstream TRM on-disk layout.

Each puzzle is made by filling a random complete 9x9 grid (randomised backtracking), then
blanking cells in random order: a blank is kept only if a solution-counting solver still
finds exactly one solution, until the puzzle has its target number of blanks (drawn uniformly
from --min-blanks..--max-blanks). Training puzzles may be augmented (digit relabelling,
optional transpose, band/row and stack/column permutations, applied to puzzle and solution
alike); the test split never is.

The output follows upstream `dataset/build_sudoku_dataset.py` exactly (shared/specs/trm.md §4):

    <out>/identifiers.json                     ["<blank>"]
    <out>/{train,test}/dataset.json            pad_id, ignore_label_id, blank_identifier_id,
                                               vocab_size 11, seq_len 81, num_puzzle_identifiers 1,
                                               total_groups, mean_puzzle_examples, total_puzzles,
                                               sets ["all"]   (keys in this order)
    <out>/{train,test}/all__inputs.npy         [N, 81] tokens: blank 1, digit d -> d + 1
    <out>/{train,test}/all__labels.npy         [N, 81] solved grid, tokens 2..10
    <out>/{train,test}/all__puzzle_identifiers.npy  [N] int32 zeros
    <out>/{train,test}/all__puzzle_indices.npy      [N + 1] int32 0..N
    <out>/{train,test}/all__group_indices.npy       [G + 1] int32; train: groups of 1 + num_aug

Inputs/labels are int64 in train when --num-aug > 0 and uint8 otherwise (and always uint8 in
test), as upstream writes them. Everything is drawn from one seeded numpy Generator, so the same
arguments give byte-identical files.

Example (from the repository root):

    python examples/sudoku/make_dataset.py --out examples/sudoku/data/sudoku-easy-2400-aug-0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ALL = 0x3FF & ~1  # bits 1..9 set: candidate digits of an unconstrained cell
BOX = [(r // 3) * 3 + c // 3 for r in range(9) for c in range(9)]  # box index of each flat cell
POPCOUNT = [bin(m).count("1") for m in range(1 << 10)]


# --- solving / generation -------------------------------------------------------------------
def count_solutions(grid: list[int], limit: int = 2) -> int:
    """Number of solutions of `grid` (81 ints, 0 = blank), counting no further than `limit`.

    Depth-first search with bitmask candidate sets; always branches on the blank cell with the
    fewest candidates, so easy puzzles are settled almost without branching.
    """
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    blanks = []
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            r, c, b = i // 9, i % 9, BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return 0  # the givens already clash
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            blanks.append(i)

    def search(todo: list[int]) -> int:
        if not todo:
            return 1
        best, best_mask, best_n = -1, 0, 10
        for j, i in enumerate(todo):
            mask = ALL & ~(rows[i // 9] | cols[i % 9] | boxes[BOX[i]])
            n = POPCOUNT[mask]
            if n < best_n:
                best, best_mask, best_n = j, mask, n
                if n <= 1:
                    break
        if best_n == 0:
            return 0
        i = todo[best]
        rest = todo[:best] + todo[best + 1:]
        r, c, b = i // 9, i % 9, BOX[i]
        found = 0
        mask = best_mask
        while mask:
            bit = mask & -mask
            mask ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            found += search(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if found >= limit:
                break
        return found

    return search(blanks)


def random_full_grid(rng: np.random.Generator) -> list[int]:
    """A uniformly-shuffled complete Sudoku grid (81 ints 1..9) by randomised backtracking."""
    grid = [0] * 81
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9

    def fill(i: int) -> bool:
        if i == 81:
            return True
        r, c, b = i // 9, i % 9, BOX[i]
        used = rows[r] | cols[c] | boxes[b]
        for v in rng.permutation(9) + 1:
            bit = 1 << int(v)
            if used & bit:
                continue
            grid[i] = int(v)
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if fill(i + 1):
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        grid[i] = 0
        return False

    fill(0)
    return grid


def make_puzzle(rng: np.random.Generator, n_blanks: int) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle, solution) as [81] digit arrays (0 = blank) with a unique solution.

    Cells are tried in random order; a cell stays blank only if uniqueness survives. If the
    order runs out before `n_blanks` is reached (only possible for large targets) the puzzle
    keeps as many blanks as it got.
    """
    solution = random_full_grid(rng)
    puzzle = list(solution)
    blanks = 0
    for i in rng.permutation(81):
        if blanks == n_blanks:
            break
        keep = puzzle[i]
        puzzle[i] = 0
        if count_solutions(puzzle) == 1:
            blanks += 1
        else:
            puzzle[i] = keep
    return np.array(puzzle, dtype=np.uint8), np.array(solution, dtype=np.uint8)


# --- augmentation ---------------------------------------------------------------------------
def augment(rng: np.random.Generator, puzzle: np.ndarray, solution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One random validity-preserving transform (spec §4.4), applied to puzzle and solution alike.

    Digits are relabelled by a random permutation of 1..9 (blank 0 stays 0); the grid is
    transposed with probability 1/2; bands and the rows inside each band, and stacks and the
    columns inside each stack, are permuted. Returned arrays are int64 (as upstream's are).
    """
    relabel = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.int64)  # digit -> digit
    transpose = rng.random() < 0.5
    row_order = np.concatenate([3 * band + rng.permutation(3) for band in rng.permutation(3)])
    col_order = np.concatenate([3 * stack + rng.permutation(3) for stack in rng.permutation(3)])

    def apply(grid: np.ndarray) -> np.ndarray:
        g = grid.reshape(9, 9)
        if transpose:
            g = g.T
        g = g[row_order][:, col_order]
        return relabel[g.reshape(81)]

    return apply(puzzle), apply(solution)


# --- writing --------------------------------------------------------------------------------
def write_split(out: Path, split: str, groups: list[list[tuple[np.ndarray, np.ndarray]]]) -> None:
    """Write one split; `groups` is a list of groups, each a list of (puzzle, solution) digit grids."""
    d = out / split
    d.mkdir(parents=True, exist_ok=True)
    puzzles = [p for g in groups for p, _ in g]
    solutions = [s for g in groups for _, s in g]
    # numpy promotion: any int64 (augmented) row makes the whole array int64, as upstream
    inputs = np.stack(puzzles) + 1  # token = digit + 1, blank (0) -> 1
    labels = np.stack(solutions) + 1
    n = len(puzzles)
    group_starts = np.cumsum([0] + [len(g) for g in groups]).astype(np.int32)
    np.save(d / "all__inputs.npy", inputs)
    np.save(d / "all__labels.npy", labels)
    np.save(d / "all__puzzle_identifiers.npy", np.zeros(n, dtype=np.int32))
    np.save(d / "all__puzzle_indices.npy", np.arange(n + 1, dtype=np.int32))
    np.save(d / "all__group_indices.npy", group_starts)
    meta = {
        "pad_id": 0,
        "ignore_label_id": 0,
        "blank_identifier_id": 0,
        "vocab_size": 11,
        "seq_len": 81,
        "num_puzzle_identifiers": 1,
        "total_groups": len(groups),
        "mean_puzzle_examples": 1.0,
        "total_puzzles": len(groups),  # upstream counts groups here, not rows
        "sets": ["all"],
    }
    (d / "dataset.json").write_text(json.dumps(meta))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output dataset folder (created)")
    ap.add_argument("--train", type=int, default=2400, help="number of training puzzles (groups)")
    ap.add_argument("--test", type=int, default=200, help="number of test puzzles")
    ap.add_argument("--num-aug", type=int, default=0, help="augmented copies per training puzzle")
    ap.add_argument("--min-blanks", type=int, default=3, help="fewest blank cells per puzzle")
    ap.add_argument("--max-blanks", type=int, default=10, help="most blank cells per puzzle")
    ap.add_argument("--seed", type=int, default=0, help="seed of the numpy random generator")
    args = ap.parse_args(argv)
    if not 0 <= args.min_blanks <= args.max_blanks <= 64:
        ap.error("need 0 <= --min-blanks <= --max-blanks <= 64")
    if args.train < 1 or args.test < 1 or args.num_aug < 0:
        ap.error("--train and --test must be >= 1 and --num-aug >= 0")

    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    seen: set[bytes] = set()

    def fresh_puzzle() -> tuple[np.ndarray, np.ndarray]:
        while True:  # no puzzle appears twice (and none is shared between train and test)
            p, s = make_puzzle(rng, int(rng.integers(args.min_blanks, args.max_blanks + 1)))
            if p.tobytes() not in seen:
                seen.add(p.tobytes())
                return p, s

    test_groups = [[fresh_puzzle()] for _ in range(args.test)]
    train_groups = []
    for _ in range(args.train):
        p, s = fresh_puzzle()
        train_groups.append([(p, s)] + [augment(rng, p, s) for _ in range(args.num_aug)])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "identifiers.json").write_text(json.dumps(["<blank>"]))
    write_split(out, "train", train_groups)
    write_split(out, "test", test_groups)

    blanks = [int((p == 0).sum()) for g in train_groups + test_groups for p, _ in g[:1]]
    print(f"wrote {out}: train {args.train} puzzles x {1 + args.num_aug} = {args.train * (1 + args.num_aug)} rows, "
          f"test {args.test} rows; blanks {min(blanks)}-{max(blanks)} (mean {np.mean(blanks):.1f}); "
          f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
