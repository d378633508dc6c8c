"""Real-size datasets: what the completeness and attribution check of one costs, against `find`.

A 3,600-frame CBF collection (small frames: the file count is the point) and an Eiger master with 36
data files (3,600 frames), written by the campaign's own detector emulation with mtimes inside their
run. Our side is the ISPyB job's check as it runs for each collection (`scan_dataset`: one directory
read and one `stat` per file; for HDF5 the master's links and each data file's shape, never pixels;
then `sharing` and `attribution_problem`), and the preflight's header reads before a pack, measured in
process. The reference is `find DIR -newer X | wc -l` on the same directory, a whole process: the
least a look at every file's mtime can cost. Files the check opens are counted with an audit hook
(Python-level opens: fabio's; h5py opens through the HDF5 library, listed by name instead).

    python bench/real_size.py [--repeat 7] [--frames 3600]

Pack and upload of the 3,600-file dataset against `tar | zstd -3 -T0` and `curl -F` are measured by
`pack_upload.py --frame-bytes 16384`; the group deposition of 300 datasets on a small tmpfs spool by
`group_deposit.py`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import figure, machine, paired, print_figures, run_measured, write_json  # noqa: E402
from mirrord.archive.preflight import preflight_images  # noqa: E402
from mirrord.emulators.campaign import FRAMES_PER_DATA_FILE, Campaign, Collection  # noqa: E402
from mirrord.jobs.datafiles import Run, attribution_problem, scan_dataset, sharing  # noqa: E402

SLACK = 120.0


def opened_files() -> list[str]:
    """Files Python opens from now on (the audit hook cannot be removed: it only appends)."""
    seen: list[str] = []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], str | bytes | Path):
            seen.append(str(args[0]))

    sys.addaudithook(hook)
    return seen


def check(directory: Path, col: Collection, zone: ZoneInfo) -> dict[str, Any]:
    """The completeness and attribution check, then the preflight's header reads."""
    started = time.perf_counter()
    scan = scan_dataset(directory, col.file_template, col.images)
    assert scan.shortfall is None and scan.mismatch is None, (scan.shortfall, scan.mismatch)
    own = Run(col.collection_id, col.file_template, col.run_status, col.start, col.end)
    problem = attribution_problem(scan, own, sharing(scan, []), zone, SLACK)
    assert problem is None, problem
    checked = time.perf_counter()
    preflight = preflight_images([directory / name for name in scan.files])
    assert preflight.ok, preflight
    return {"seconds": checked - started, "preflight_s": time.perf_counter() - checked, "files": len(scan.files)}


def measure(name: str, directory: Path, col: Collection, zone: ZoneInfo, repeat: int,
            opened: list[str]) -> dict[str, Any]:
    marker = directory.parent / f"{name.split()[0]}.before"
    marker.touch()
    os.utime(marker, (0, 0))  # older than every frame: find lists them all
    before = len(opened)
    check(directory, col, zone)  # warm: both sides read a cached directory
    files_opened = sorted({Path(p).name for p in opened[before:] if Path(p).parent == directory})
    find = f"find {shlex.quote(str(directory))} -newer {shlex.quote(str(marker))} | wc -l"
    ours, reference = paired(lambda: check(directory, col, zone),
                             lambda: {"seconds": run_measured([find], shell=True).seconds}, repeat)
    listed = int(run_measured([find], shell=True).stdout.strip())
    files = ours[0]["files"]
    return figure(f"completeness + attribution, {name} ({files} files)", ours, reference,
                  "~1 stat/file", files=files, find_listed=listed,
                  preflight_s=sorted(r["preflight_s"] for r in ours)[len(ours) // 2],
                  python_opens=files_opened)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--frames", type=int, default=3600)
    args = parser.parse_args(argv)
    campaign = Campaign.demo(seed=0, targets=1, experiments=1, image_size=1024)
    tas = campaign.targets[0].tas
    cbf = campaign.add_collection(tas, "REAL-cbf", images=args.frames, style="cbf")
    eiger = campaign.add_collection(tas, "REAL-eiger", images=args.frames, style="h5")
    zone = ZoneInfo(campaign.timezone)
    opened = opened_files()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mirrord-real-") as tmp:
        for name, col in (("CBF", cbf), ("Eiger master", eiger)):
            t0 = time.perf_counter()
            directory = campaign.write_images(Path(tmp), col)
            print(f"wrote {name}: {len(list(directory.iterdir()))} files in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            rows.append(measure(name, directory, col, zone, args.repeat, opened))
    print_figures(rows)
    for r in rows:
        print(f"{r['figure']}: find lists {r['find_listed']}; preflight headers {r['preflight_s']:.3f} s; "
              f"files Python opened: {len(r['python_opens'])} ({', '.join(r['python_opens'][:4])})")
    print(f"HDF5: {args.frames // FRAMES_PER_DATA_FILE} data files, opened by h5py for links and shapes")
    print(f"wrote {write_json('real_size', {'figures': rows, 'machine': machine()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
