"""
Print `make mutation`'s score per module from mutmut's result files under mutants/.

mutmut's own `results` lists mutants one by one; the score the README quotes is killed over
total per module. A timeout counts as killed (the mutant made the tests hang, which fails them);
"no tests" (no selected test reaches the code) and "survived" count against the score.
"""
from __future__ import annotations

from collections import Counter
import json
from pathlib import Path
import sys

# mutmut's exit-code convention (mutmut/stats.py): 1 and 3 are failed tests, 0 passed tests.
KILLED = {1, 3}
TIMEOUT = {24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def verdict(exit_code: int | None) -> str:
    """Name one mutant's outcome from the exit code mutmut recorded for it."""
    if exit_code in KILLED:
        return 'killed'
    if exit_code in TIMEOUT:
        return 'timeout'
    if exit_code in SURVIVED:
        return 'survived'
    if exit_code in NO_TESTS:
        return 'no tests'
    return 'other'


def main(mutants: Path) -> int:
    """Print one row per mutated module and a total; fail when mutmut left no results."""
    counts: dict[str, Counter[str]] = {}
    for meta in sorted(mutants.rglob('*.py.meta')):
        exit_codes = json.loads(meta.read_text())['exit_code_by_key']
        if not exit_codes:
            continue
        module = str(meta.relative_to(mutants)).removesuffix('.py.meta').replace('/', '.')
        counts[module] = Counter(verdict(code) for code in exit_codes.values())
    if not counts:
        print(f'no mutmut results under {mutants}/ (run `make mutation`)', file=sys.stderr)
        return 1
    columns = ('killed', 'timeout', 'survived', 'no tests', 'other')
    print(f"{'module':40} {'score':>14} " + ' '.join(f'{c:>9}' for c in columns))
    total: Counter[str] = Counter()
    for module, count in [*counts.items(), ('total', total)]:
        if module != 'total':
            total.update(count)
        caught = count['killed'] + count['timeout']
        n = sum(count.values())
        score = f'{caught}/{n} {100 * caught / n:5.1f}%'
        print(f'{module:40} {score:>14} ' + ' '.join(f'{count[c]:>9}' for c in columns))
    return 0


if __name__ == '__main__':
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else 'mutants')))
