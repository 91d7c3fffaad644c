"""Submit scorecam-video to a Ray cluster as a job, follow its logs, exit 0 when it succeeds.

    python scripts/submit_job.py --address http://HEAD:8265 -- clip.mp4 --gpus 8 -o out.mp4

Everything after ``--`` is passed to ``scorecam-video``. The working directory (default ``.``,
minus what .gitignore and ``--exclude`` leave out) is uploaded and becomes the job's current
directory, so relative input paths inside it work; outputs written to a relative path stay in
the job's directory on the cluster: give ``-o`` a path on storage the cluster shares.

Inside the job Ray sets ``RAY_ADDRESS``, so ``scorecam-video`` connects its workers to this
cluster. The cluster's Python environment must have scorecam-stream installed (or pass
``--entrypoint "python -m scorecam_stream.cli"`` where the working directory holds the package).
With token authentication on, set ``RAY_AUTH_TOKEN`` (``ray get-auth-token``) before running.
Exit status: 0 when the job SUCCEEDED, 1 otherwise (failed, stopped, or interrupted here), 2
when the cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys

from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

DEFAULT_EXCLUDES = [".git", ".venv", "__pycache__", "*.egg-info", "out"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Return (this script's options, the scorecam-video arguments after ``--``)."""
    if "--" in argv:
        split = argv.index("--")
        own, video_args = argv[:split], argv[split + 1 :]
    else:
        own, video_args = argv, []
    parser = argparse.ArgumentParser(
        description="Submit scorecam-video as a Ray job and follow it.",
        usage="%(prog)s [options] -- INPUT [scorecam-video options]",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)",
    )
    parser.add_argument("--working-dir", default=".", help="directory uploaded for the job")
    parser.add_argument(
        "--num-gpus",
        type=float,
        default=0,
        help="GPUs reserved for the entrypoint itself (default 0: the GPU "
        "workers reserve their own)",
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="CPUs reserved for the entrypoint (decode, render, encode)",
    )
    parser.add_argument(
        "--entrypoint", default="scorecam-video", help="command the arguments after -- are given to"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="more paths/globs left out of the upload (repeatable)",
    )
    parser.add_argument(
        "--no-follow", action="store_true", help="print the job id and return without waiting"
    )
    args = parser.parse_args(own)
    if not video_args:
        parser.error("give the scorecam-video arguments after --, e.g. -- clip.mp4 --gpus 4")
    return args, video_args


async def follow(client: JobSubmissionClient, job_id: str) -> None:
    """Print the job's logs as they come, until it ends."""
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, video_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        client = JobSubmissionClient(args.address)
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot reach the Ray cluster: {first}", file=sys.stderr)
        if "auth" in str(err).lower():
            print(
                "hint: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token>",
                file=sys.stderr,
            )
        return 2
    entrypoint = f"{args.entrypoint} {shlex.join(video_args)}"
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": args.working_dir, "excludes": DEFAULT_EXCLUDES + args.exclude},
        entrypoint_num_gpus=args.num_gpus or None,
        entrypoint_num_cpus=args.num_cpus,
    )
    print(f"submitted job {job_id}: {entrypoint}", file=sys.stderr)
    if args.no_follow:
        return 0
    try:
        asyncio.run(follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping job {job_id}", file=sys.stderr)
        client.stop_job(job_id)
        return 1
    info = client.get_job_info(job_id)
    status = info.status
    reason = (info.message or "").strip().splitlines()
    print(f"job {job_id}: {status.value}" + (f" ({reason[0]})" if reason else ""), file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
