"""Docker runner start-up: the first start (image build) against later starts (cached image).

    python3 bench/docker_start.py [--starts 5] [--target seed-fixed]

The target gets an image name of its own (a fresh suffix), so the first start builds its
image; the next ``--starts`` reuse it.  Each time is ``DockerRunner.start`` until the target is
ready, stop excluded.  The image is removed afterwards.  The ratio is the first start over the
median cached start; the cached start itself is the figure that matters to a user running a
suite (every test starts a fresh container).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import uuid

import _common as c

from afterclose.harness import launch, ports
from afterclose.harness.runners.docker import DockerRunner, images
from afterclose.harness.runners.docker.engine import connect

COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "first start (image build)",
    "cached start: median (min-max, starts)",
    "ratio first / cached",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--target", default="seed-fixed")
    args = parser.parse_args()
    command = c.command_line(
        "docker_start.py", [f"--starts={args.starts}", f"--target={args.target}"]
    )
    load_before = c.load()
    manifest = c.seed_manifest(args.target)
    artefact = c.build(manifest)
    manifest = dataclasses.replace(manifest, name=f"bench-{manifest.name}-{uuid.uuid4().hex[:6]}")
    runner = DockerRunner()
    times: list[float] = []
    client = connect()
    try:
        with c.scratch("docker-start") as scratch:
            for i in range(1 + args.starts):
                with ports.lease_port(c.HOST) as lease:
                    plan = launch.make_plan(
                        manifest,
                        host=c.HOST,
                        port=lease.port,
                        workdir=scratch / f"w{i}",
                        artefact=artefact,
                    )
                    started = time.monotonic()
                    target = runner.start(plan)
                    times.append(time.monotonic() - started)
                    built = runner.last_image.built
                    target.stop()
                print(f"start {i}: {times[-1]:.2f} s (image built: {built}); load {c.load()}")
    finally:
        for image in client.images.list(name=images.repo_name(manifest.name)):
            client.images.remove(image.id, force=True)
        client.close()
    cached = times[1:]
    ratio = c.ratio(times[0], c.median(cached))
    c.append_row(
        "docker-start",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            f"{times[0]:.2f} s",
            f"{c.median(cached):.2f} s ({min(cached):.2f}-{max(cached):.2f}, {len(cached)})",
            f"{ratio:.1f}",
        ],
        title="Docker runner start-up",
    )
    print(f"first start {times[0]:.2f} s, cached start median {c.median(cached):.2f} s")
    print(f"ratio first / cached start: {ratio:.1f}")


if __name__ == "__main__":
    main()
