"""The README's CIFAR command, run verbatim as a user runs it: how long it takes, and what it keeps.

Reads the ``decouple ../shared/assets/cifar10/resnet20...`` block of ``README.md`` (the one with
``--target-flops``), runs it with ``bash`` in a new temporary folder that has ``../shared`` beside
it (a link to this checkout's), so its relative paths and its ``--out`` resolve as they do for a
user in a fresh clone, and writes ``results/readme_command.md``: wall seconds (the child's whole
life: start-up, loading, planning, calibration, evaluation, writing), peak memory, the report's
stages and top-1 before and after. ``--repeat N`` runs it N times (the table shows each).

Run (needs ../shared/assets; about a minute a run on 2 cores)::

    pip install -e '.[dev,vision]' && python experiments/readme_command.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiment_io import output_folder

ROOT = Path(__file__).resolve().parent.parent


def readme_command(readme: Path = ROOT / "README.md") -> str:
    """The first fenced ``bash`` block of the README that runs ``decouple`` on the shared
    ResNet-20 with a FLOPs budget, as one line (backslash continuations joined)."""
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        line = re.sub(r"\\\n\s*", "", block).strip()
        if (
            line.startswith("decouple ../shared/assets/cifar10/resnet20")
            and "--target-flops" in line
        ):
            return line
    raise SystemExit("readme_command: no CIFAR command with --target-flops found in README.md")


def run_once(command: str, shared: Path) -> dict:
    """Run ``command`` in a fresh folder beside a link to ``shared``; wall time, peak RSS and
    the report it wrote."""
    top = Path(tempfile.mkdtemp(prefix="decouple-readme-"))
    try:
        work = top / "work"
        work.mkdir()
        (top / "shared").symlink_to(shared.resolve())
        bindir = str(Path(sys.executable).parent)  # the `decouple` script of this environment
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
        start = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", command], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"readme_command: the command failed:\n{out[-2000:]}")
        reports = list(work.glob("*.report.json"))
        if len(reports) != 1:
            raise SystemExit(f"readme_command: expected one report, found {len(reports)}")
        report = json.loads(reports[0].read_text())
        return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1e6, "report": report}
    finally:
        shutil.rmtree(top, ignore_errors=True)


def accuracy(report: dict) -> dict | None:
    """The report's ``accuracy`` section, wherever it sits."""
    if "accuracy" in report:
        return report["accuracy"]
    return report.get("extra", {}).get("accuracy")


def write(command: str, runs: list[dict], out: Path) -> None:
    lines = [
        "# The README's CIFAR command, as a user runs it",
        "",
        "Written by `python experiments/readme_command.py`: the command below, read from README.md",
        "and run verbatim with `bash` in a fresh folder with `../shared` beside it. Wall seconds are",
        "the child process's whole life (start-up, loading, planning, calibration, evaluation,",
        "writing the outputs); peak memory is its own.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| run | wall (s) | peak RSS (GB) | top-1 before | top-1 after | FLOPs | stages (s) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, r in enumerate(runs, 1):
        rep = r["report"]
        acc = accuracy(rep) or {}
        before = acc.get("before", {}).get("top1")
        after = acc.get("after", {}).get("top1")
        stages = rep.get("timings", {}).get("stages", {})
        big = ", ".join(f"{s} {v:.1f}" for s, v in stages.items() if v >= 0.5)
        ratio = rep["totals"]["flops_before"] / rep["totals"]["flops_after"]
        lines.append(
            f"| {k} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | "
            + (f"{100 * before:.2f} %" if before is not None else "–")
            + " | "
            + (f"{100 * after:.2f} %" if after is not None else "–")
            + f" | {ratio:.2f}× | {big} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "readme_command.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'readme_command.md'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="runs, each shown")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = output_folder(p, args.out, None, "readme-command-")
    shared = ROOT.parent / "shared"
    if not (shared / "assets/cifar10/resnet20-12fca82f.th").is_file():
        sys.exit("readme_command: ../shared/assets (the shared CIFAR-10 assets) is not found")
    command = readme_command()
    print(command, flush=True)
    runs = []
    for _ in range(args.repeat):
        runs.append(run_once(command, shared))
        print(f"{runs[-1]['wall_s']:.1f} s, {runs[-1]['peak_rss_gb']:.2f} GB", flush=True)
    write(command, runs, out)


if __name__ == "__main__":
    main()
