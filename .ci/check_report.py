"""Check a Snakemake HTML report: every expected result is in it, under its category, with its data embedded and a
caption that names its setting and command.

    python .ci/check_report.py report.html "Main results=summary.csv,reward_vs_step.png" "Compute cost=..."
"""

import json
import re
import sys
from pathlib import Path


def embedded(html: str, name: str) -> dict:
    match = re.search(rf"var {name} = (\{{.*?\}});\s*</script>", html, re.S)
    if not match:
        raise SystemExit(f"no '{name}' data in the report")
    return json.loads(match.group(1))


def main(report: str, *expected: str) -> None:
    html = Path(report).read_text()
    results, categories = embedded(html, "results"), embedded(html, "categories")
    problems = []
    for entry in expected:
        category, names = entry.split("=", 1)
        files = {Path(path).name for subcategories in categories.get(category, {}).values() for path in subcategories}
        if category not in categories:
            problems.append(f"category {category!r} missing (have {sorted(categories)})")
        for name in names.split(","):
            if name not in files:
                problems.append(f"{category}: {name} missing (have {sorted(files)})")
    for path, result in results.items():
        if not result["data_uri"].startswith("data:"):
            problems.append(f"{path}: its data is not embedded")
        if "Made by" not in result["caption"] or "Setting" not in result["caption"]:
            problems.append(f"{path}: the caption names no setting or command: {result['caption'][:200]!r}")
    if problems:
        raise SystemExit("report check failed:\n  " + "\n  ".join(problems))
    print(f"{report}: {len(results)} results in {len(categories)} categories ({', '.join(categories)}), all expected "
          "ones present, every caption names its setting and command")


if __name__ == "__main__":
    main(*sys.argv[1:])
