"""Pick the first N photos of each class of a labelled folder for `make demo`, as symbolic links.

    python scripts/demo_photos.py SOURCE DEST N

DEST/<class>/<file> links to SOURCE/<class>/<file> (nothing is copied). DEST is made new each
time; an existing DEST is removed only when it holds nothing but links this script made.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARK = ".demo-photos"


def main(source: str, dest: str, count: str) -> int:
    source_dir, dest_dir, n = Path(source), Path(dest), int(count)
    if not source_dir.is_dir():
        print(f"demo: {source_dir} is missing (the shared data kit, ../shared/data)", file=sys.stderr)
        return 1
    if dest_dir.exists():
        entries = [p for p in dest_dir.rglob("*") if p.name != MARK]
        if not (dest_dir / MARK).is_file() or any(not (p.is_symlink() or p.is_dir()) for p in entries):
            print(f"demo: {dest_dir} exists and was not made by this script: remove it or set DEMO_OUT", file=sys.stderr)
            return 1
        for path in sorted(entries, key=lambda p: len(p.parts), reverse=True):
            path.unlink() if path.is_symlink() else path.rmdir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / MARK).write_text("links made by scripts/demo_photos.py\n")
    for class_dir in sorted(p for p in source_dir.iterdir() if p.is_dir()):
        (dest_dir / class_dir.name).mkdir()
        for photo in sorted(p for p in class_dir.iterdir() if p.is_file())[:n]:
            (dest_dir / class_dir.name / photo.name).symlink_to(photo.resolve())
    print(f"demo: {n} photos per class of {source_dir} linked in {dest_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
