"""`python -m reference NN [flags]`: chapter NN's experiment, run by the reference trainers.

It takes the chapter script's flags and writes the same DIR/metrics.jsonl and DIR/summary.json,
so `python -m reference.compare` can diff the two runs step by step."""
import sys

from .chapters import CHAPTERS, run

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHAPTERS:
        sys.exit(f"usage: python -m reference {{{','.join(CHAPTERS)}}} [chapter flags]; "
                 f"try: python -m reference 01 --help")
    run(sys.argv[1], sys.argv[2:])
