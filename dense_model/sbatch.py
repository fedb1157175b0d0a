"""The head of the sbatch scripts the tools write (a study's array, ``--every-checkpoint --slurm``).

sbatch reads ``#SBATCH`` lines only above the script's first command, so the head is written in
one place: the shebang, a comment saying what wrote the script, the ``#SBATCH`` options, then
``set -euo pipefail`` and ``cd`` to the repository. The caller appends its commands.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable


def sbatch_header(
    comment: str,
    *,
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    log_dir: str,
    workdir: str,
    time: str | None = None,
    signal: str | None = None,
    partition: str | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """The script's first lines, one task per node, ``log_dir/%x-%A_%a.out`` per array task; options
    left None are sbatch's (or its SBATCH_* environment variables'). ``extra``: more sbatch options
    (``--account=acme``), one per line."""
    options = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus_per_node}",
        *([f"--time={time}"] if time else []),
        *([f"--signal={signal}"] if signal else []),
        f"--output={log_dir}/%x-%A_%a.out",
        *([f"--partition={partition}"] if partition else []),
        *extra,
    ]
    return [
        "#!/usr/bin/env bash",
        f"# {comment}",
        *(f"#SBATCH {option}" for option in options),
        "set -euo pipefail",  # the first command: no #SBATCH line may follow
        f"cd {shlex.quote(str(workdir))}",
    ]
