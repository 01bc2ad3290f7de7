"""Extracts the shell blocks of a Markdown file with their `readme-test` markers.

Every ```sh (or bash, shell, console) block must be preceded, on the line before its fence
(blank lines allowed between), by a marker comment:

    <!-- readme-test: server -->            the command that starts the server of the tour
    <!-- readme-test: tour -->              run as written, in order, against that server
    <!-- readme-test: ci FILE [why] -->     every command line is a line of FILE (which CI runs)
    <!-- readme-test: ci-prefix FILE why --> every command line begins a line of FILE, which adds
                                            arguments (say which in `why`)
    <!-- readme-test: skip: REASON -->      not run; the reason is mandatory

Writes one file per block into OUT_DIR (`NN-KIND.sh`, and `NN-KIND.arg` with the marker's
argument) and exits 1, naming the line, on a block without a valid marker.

    python3 tests/readme/blocks.py README.md OUT_DIR
"""

import pathlib
import re
import sys

SHELL = {"sh", "bash", "shell", "console"}
MARKER = re.compile(r"^<!--\s*readme-test:\s*(server|tour|ci-prefix|ci|skip)\b[:\s]*(.*?)\s*-->$")


def blocks(text):
    """Yields (line number, kind, argument, body) per shell block, raising ValueError."""
    lines = text.split("\n")
    marker = None  # (kind, argument, line) of the last marker not yet used
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        found = MARKER.match(line)
        if found:
            marker = (found.group(1), found.group(2), i + 1)
        elif line.startswith("```"):
            info = line[3:].strip().split(",")[0].split(" ")[0]
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith("```"):
                end += 1
            if info in SHELL:
                if marker is None:
                    raise ValueError(
                        f"line {i + 1}: a ```{info} block without a <!-- readme-test: … --> marker"
                    )
                kind, argument, _ = marker
                if kind == "skip" and not argument:
                    raise ValueError(f"line {i + 1}: `skip` needs a reason")
                if kind.startswith("ci") and not argument:
                    raise ValueError(f"line {i + 1}: `{kind}` needs the file CI runs")
                yield i + 1, kind, argument, "\n".join(lines[i + 1 : end]) + "\n"
            marker = None
            i = end
        elif line:
            # A marker applies to the next block only if nothing but blank lines is between.
            marker = None
        i += 1


def main():
    source, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    try:
        for n, (line, kind, argument, body) in enumerate(blocks(source.read_text())):
            stem = out / f"{n:02d}-{kind}"
            stem.with_suffix(".sh").write_text(f"# {source}:{line}\n{body}")
            stem.with_suffix(".arg").write_text(argument)
    except ValueError as error:
        print(f"{source}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
