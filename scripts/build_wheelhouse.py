"""An offline wheelhouse of everything dense_model needs except torch and Triton, for a given Python
and platform: the install path for GPU images and NGC containers (whose torch comes with TE and
apex built against it, which ``pip install -r requirements.txt`` would replace) and air-gapped
clusters.

The package list is the closure of requirements.txt (and requirements-dev.txt: pytest for the GPU
check) over the dependencies this environment has installed, pinned at the versions installed
here, without torch, Triton, pytorch-triton, NVIDIA's CUDA wheels (nvidia-*, cuda-*) and numpy: the
machine's own are kept (its torch was built against its numpy; and Triton 3.6's interpreter, which
the kernel tests use for the bench scripts' smoke run, fails with numpy 2.4 and runs with 2.2:
measured on the CPU, docs/benchmarks.md). ``--with-numpy`` adds numpy for a machine without it. Wheels come from ``pip download --only-binary=:all: --python-version
--platform``; a package with no wheel there (a pure-Python sdist) is built into a wheel here.

    python scripts/build_wheelhouse.py --python-version 3.12 --platform manylinux_2_28_x86_64 --out wheelhouse
    python scripts/build_wheelhouse.py --dry-run --out wheelhouse     # only the list and the commands

On the target machine (its torch >= 2.11, Triton 3.6-3.9 and numpy stay as they are):

    pip install --no-index --find-links wheelhouse --no-deps -r wheelhouse/requirements-keep-torch.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP_MACHINE = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*|cuda-.*|numpy)$")
REQUIREMENT_FILES = ("requirements.txt", "requirements-dev.txt")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level(files) -> list[str]:
    """Requirement names in the requirement files (comments, options and markers dropped)."""
    names = []
    for path in files:
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                names.append(canonical(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]))
    return names


def closure(names: list[str], python_version: str, with_numpy: bool = False) -> dict[str, str]:
    """{name: installed version} of ``names`` and their dependencies as installed here (markers
    evaluated for ``python_version`` on Linux, extras not followed), torch/Triton/CUDA excluded."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".0"}
    env.update(sys_platform="linux", platform_system="Linux", os_name="posix", extra="")
    found, todo = {}, list(names)
    while todo:
        name = canonical(todo.pop())
        if name in found or (KEEP_MACHINE.match(name) and not (with_numpy and name == "numpy")):
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as err:
            raise SystemExit(
                f"build_wheelhouse: {name} is not installed here; install requirements.txt first"
            ) from err
        found[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return dict(sorted(found.items()))


def download_command(pins_file: Path, out: Path, python_version: str, platforms: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(out)]
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        cmd += ["--platform", platform]
    return cmd + ["-r", str(pins_file)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    p.add_argument(
        "--platform",
        action="append",
        default=None,
        help="pip platform tag, repeatable (default: manylinux_2_28_x86_64, manylinux2014_x86_64, linux_x86_64)",
    )
    p.add_argument(
        "--out", default="wheelhouse", help="folder for the wheels and the list (default: %(default)s)"
    )
    p.add_argument(
        "--no-dev",
        action="store_true",
        help="leave out requirements-dev.txt (pytest: the GPU check needs it)",
    )
    p.add_argument("--with-numpy", action="store_true", help="include numpy (default: the machine's is kept)")
    p.add_argument(
        "--dry-run", action="store_true", help="write the list, print the commands, download nothing"
    )
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        print(
            f"build_wheelhouse: --python-version {args.python_version!r}: write it as 3.11", file=sys.stderr
        )
        return 2
    platforms = args.platform or ["manylinux_2_28_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    files = [REPO / f for f in REQUIREMENT_FILES[: 1 if args.no_dev else 2]]
    pins = closure(top_level(files), args.python_version, args.with_numpy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pins_file = out / "requirements-keep-torch.txt"
    pins_file.write_text(
        "# dense_model's dependencies without torch/Triton/CUDA wheels/numpy (the machine's own are kept):\n"
        "#   pip install --no-index --find-links . --no-deps -r requirements-keep-torch.txt\n"
        + "".join(f"{name}=={version}\n" for name, version in pins.items())
    )
    cmd = download_command(pins_file, out, args.python_version, platforms)
    print(f"build_wheelhouse: {len(pins)} packages in {pins_file}")
    print("build_wheelhouse: " + " ".join(cmd))
    if args.dry_run:
        return 0
    if subprocess.run(cmd).returncode == 0:
        return 0
    # Some packages publish only an sdist (pure Python): download the wheels one by one and build
    # the missing ones here (a pure-Python wheel fits any platform).
    missing = []
    for name, version in pins.items():
        one = download_command(pins_file, out, args.python_version, platforms)[:-2] + [f"{name}=={version}"]
        if subprocess.run(one, capture_output=True).returncode != 0:
            wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out)]
            if subprocess.run([*wheel, f"{name}=={version}"]).returncode != 0:
                missing.append(f"{name}=={version}")
    if missing:  # exit status 1, the message on stderr
        sys.exit(f"build_wheelhouse: no wheel for {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
