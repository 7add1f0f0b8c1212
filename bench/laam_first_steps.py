"""Rehearsal: the LaaM 5M recipe's first optimizer steps, at LaaM's global batch of 64 (micro-batches
of 8), on a tree of the same shape as Linux 1.0 (506 files, 4.54 MB of C), measured for time and
peak RSS with /usr/bin/time -v.

kernel.org is unreachable from this project's machines, so the tree is made from the Linux UAPI
headers this machine has (/usr/include/linux, GPL-2.0 WITH Linux-syscall-note): the 506 largest
headers up to 4.54 MB. The recipe is LaaM's own (recipes/laam-linux-1.0-5m.toml) with the input
swapped for that tree and each stage cut to a few steps. Not part of `make test`.

Usage: python bench/laam_first_steps.py [--steps 2] [--out /tmp/laam-first-steps]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET_FILES, TARGET_BYTES = 506, 4_540_000


def make_tree(dest: Path) -> tuple[int, int]:
    files = sorted((p for p in Path("/usr/include/linux").rglob("*.h") if p.is_file()),
                   key=lambda p: (-p.stat().st_size, str(p)))
    if dest.exists():
        shutil.rmtree(dest)
    n = total = 0
    for p in files:
        if n == TARGET_FILES or total >= TARGET_BYTES:
            break
        data = p.read_bytes()[: TARGET_BYTES - total]
        try:
            data.decode("ascii")
        except UnicodeDecodeError:
            continue
        out = dest / "linux" / p.relative_to("/usr/include/linux")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        n, total = n + 1, total + len(data)
    return n, total


def laam_shape_recipe(tree: Path, blake3: str, steps: int) -> str:
    """LaaM's own recipe with its input swapped for `tree` (every header in it) and each stage cut to
    `steps` steps. The tree has no Makefiles, so the audit's control set (LaaM's Makefiles) goes."""
    text = (ROOT / "recipes" / "laam-linux-1.0-5m.toml").read_text()
    inputs = re.search(r"\[\[inputs\]\].*?(?=\n\[)", text, re.S).group(0)
    text = text.replace(inputs, f'[[inputs]]\nname = "linux"\nkind = "path"\npath = "{tree}"\nblake3 = "{blake3}"\n'
                                f'license = "GPL-2.0-only WITH Linux-syscall-note"\n')
    text = re.sub(r'include = \[.*?\]', 'include = ["**/*.h"]', text, count=1, flags=re.S)
    text = re.sub(r"^(exclude|manifest_root|control_include) = .*$", "", text, flags=re.M)
    return text.replace("epochs = 100", f"steps = {steps}").replace("warmup_steps = 100", "warmup_steps = 1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="/tmp/laam-first-steps")
    a = ap.parse_args()
    from provenance.inputs.store import tree_digest

    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    n, total = make_tree(tree)
    recipe = work / "laam-shape.toml"
    recipe.write_text(laam_shape_recipe(tree, tree_digest(tree)["blake3"], a.steps))
    print(f"tree: {n} files, {total} bytes (Linux 1.0: 506 files, 4.54 MB)")
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "provenance"), "build", str(recipe),
                        "--out", str(work / "build"), "--store", str(work / "store"), "--no-cache"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / (1 << 20)
    print("\n".join(line for line in p.stderr.splitlines() if not line.startswith("\t") and "train:" not in line))
    print(p.stdout.strip())
    print(f"exit {p.returncode}; wall {wall:.1f} s; peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
