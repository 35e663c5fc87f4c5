r"""Size and repetition of the bundle configs (issue "One house"); also the JSON format check of `make lint`.

Lines are counted in the canonical format, the one model-zoo's pre-commit hook ``pretty-format-json --autofix
--no-sort-keys --indent=4`` (pre-commit-hooks) writes: ``json.dumps(indent=4, ensure_ascii=True)`` (the hook
escapes non-ASCII as ``\uXXXX`` unless given ``--no-ensure-ascii``, which the zoo does not pass), key order
kept, ``", "``/``": "`` separators, one final newline; so the numbers do not depend on how compactly a file is
written. ``metadata.json`` is excluded. A top-level entry is *repeated* when the same key with the same value
appears at the top level of another config file (of any bundle, or another file of the same bundle).

    python scripts/bundle_config_stats.py [BUNDLES_DIR] [--check] [--fix]

``--check`` exits 1 when a config file (or ``bundles/*.json``, the schema copy) is not in the canonical format;
``--fix`` rewrites those files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def canonical(obj) -> str:
    """The text model-zoo's ``pretty-format-json --no-sort-keys --indent=4`` accepts for ``obj``."""
    return json.dumps(obj, indent=4, ensure_ascii=True, separators=(",", ": ")) + "\n"


def config_files(bundles: Path, metadata: bool = False) -> list[Path]:
    files = sorted(bundles.glob("*/configs/*.json"))
    return [f for f in files if metadata or f.name != "metadata.json"]


def stats(bundles: Path) -> dict:
    files = config_files(bundles)
    data = {f: json.loads(f.read_text(encoding="utf-8")) for f in files}
    seen = defaultdict(set)
    for f, d in data.items():
        for k, v in d.items():
            seen[(k, json.dumps(v, sort_keys=True))].add(f)
    per_bundle: dict[str, int] = defaultdict(int)
    total = repeated = 0
    for f, d in data.items():
        n = len(canonical(d).splitlines())
        per_bundle[f.parts[-3]] += n
        total += n
        for k, v in d.items():
            if len(seen[(k, json.dumps(v, sort_keys=True))]) > 1:
                repeated += len(json.dumps({k: v}, indent=4).splitlines()) - 2  # the entry's own lines
    return {"files": len(files), "bundles": dict(per_bundle), "total_lines": total,
            "lines_per_bundle": total / max(1, len(per_bundle)), "repeated_lines": repeated,
            "repeated_fraction": repeated / max(1, total)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="?", default=str(Path(__file__).resolve().parents[1] / "bundles"))
    parser.add_argument("--check", action="store_true", help="fail when a config is not canonically formatted")
    parser.add_argument("--fix", action="store_true", help="rewrite configs in the canonical format")
    args = parser.parse_args(argv)
    bundles = Path(args.bundles)
    if args.check or args.fix:
        bad = []
        # every JSON file the zoo's hook would see: the configs and metadata, and the shared schema copy
        for f in sorted(set(config_files(bundles, metadata=True)) | set(bundles.glob("*.json"))):
            text = f.read_text(encoding="utf-8")
            want = canonical(json.loads(text))
            if text != want:
                if args.fix:
                    f.write_text(want, encoding="utf-8")
                else:
                    bad.append(f)
        for f in bad:
            print(f"{f}: not in the canonical JSON format (run: python scripts/bundle_config_stats.py --fix)")
        if bad:
            return 1
    s = stats(bundles)
    for name, n in sorted(s["bundles"].items()):
        print(f"{name:28s} {n:5d} lines")
    print(f"{s['files']} config files (metadata excluded), {s['total_lines']} lines, "
          f"{s['lines_per_bundle']:.0f} per bundle; {s['repeated_lines']} lines ({100 * s['repeated_fraction']:.1f} %) "
          f"in top-level entries repeated verbatim in another config file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
