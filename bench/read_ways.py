"""Ways to read one gzipped NIfTI volume: CPU seconds and peak memory of each, in its own process.

Compares :func:`sparseslice.io.read_volume` with nibabel (``dataobj``, ``get_fdata``), SimpleITK,
and plain decompression of the file's bytes (``zlib``, ``gzip``, ``isal`` when importable), so the
cost of the format (inflate) is told apart from the cost of the readers around it.

    .venv/bin/python bench/read_ways.py /tmp/ct/imagesTr/ct_000.nii.gz --repeat 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _sparseslice(path: str) -> Any:
    from sparseslice.io import read_volume

    return read_volume(path).array


def _nib_dataobj(path: str) -> Any:
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj)


def _nib_unscaled(path: str) -> Any:
    import nibabel as nib

    return nib.load(path).dataobj.get_unscaled()


def _nib_fdata(path: str) -> Any:
    import nibabel as nib

    return nib.load(path).get_fdata()


def _nib_fdata32(path: str) -> Any:
    import nibabel as nib

    return nib.load(path).get_fdata(dtype=np.float32)


def _sitk(path: str) -> Any:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _sitk_view(path: str) -> Any:
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    return sitk.GetArrayViewFromImage(img).sum(dtype=np.int64)  # keeps img alive while viewed


def _zlib(path: str) -> Any:
    import zlib

    return zlib.decompress(Path(path).read_bytes(), 16 + zlib.MAX_WBITS)


def _gzip(path: str) -> Any:
    import gzip

    return gzip.decompress(Path(path).read_bytes())


def _gzip_readinto(path: str) -> Any:
    import gzip

    with gzip.open(path, "rb") as f:
        raw = f.read()
    return raw


def _isal(path: str) -> Any:
    from isal import igzip  # type: ignore[import-not-found]

    return igzip.decompress(Path(path).read_bytes())


WAYS = {"sparseslice": _sparseslice, "nib_dataobj": _nib_dataobj, "nib_unscaled": _nib_unscaled,
        "nib_fdata64": _nib_fdata, "nib_fdata32": _nib_fdata32, "sitk": _sitk, "sitk_view": _sitk_view,
        "zlib": _zlib, "gzip": _gzip, "gzip_open_read": _gzip_readinto, "isal": _isal}


def _child(way: str, path: str, repeat: int) -> dict[str, Any]:
    import importlib

    for mod in ("nibabel", "SimpleITK", "sparseslice.io", "gzip", "zlib"):
        importlib.import_module(mod)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpus, walls = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = WAYS[way](path)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"way": way, "cpu_s": round(min(cpus), 3), "wall_s": round(min(walls), 3),
            "rss0_mib": round(rss0), "peak_mib": round(peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--repeat", type=int, default=3, help="reads per way (the fastest is reported)")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.path, args.repeat)))
        return
    print(f"{'way':<16}{'cpu s':>8}{'wall s':>8}{'rss0 MiB':>10}{'peak MiB':>10}")
    for way in args.ways.split(","):
        out = subprocess.run([sys.executable, __file__, args.path, "--repeat", str(args.repeat), "--child", way],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{way:<16} FAILED: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{way:<16}{r['cpu_s']:>8.2f}{r['wall_s']:>8.2f}{r['rss0_mib']:>10}{r['peak_mib']:>10}", flush=True)


if __name__ == "__main__":
    main()
