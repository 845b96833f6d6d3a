# The fuzz proof of issue 8, bounded for the suite: tools/fuzz_images.py with a fixed
# seed damages a real image set 200 ways (byte flips, truncation, appended garbage, zeroed
# and huge length prefixes, swapped files) and runs `restore` and every crit command on
# each, in a private mount namespace with / read-only. No crash, no hang, nothing left
# behind, no restore from damaged images; every restore names the damage.
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.needs_tool


def test_fuzzed_images_never_crash_hang_or_restore():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz_images.py"),
                          "--cases", "200", "--seed", "8"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    counts = json.loads(res.stdout)["counts"]
    print(counts)
    assert counts["cases"] == 200
    assert counts["crash"] == counts["hang"] == counts["left_behind"] == counts["wrong_restore"] == 0
    # a restore succeeds only when the damage hit nothing but the checksum image's own
    # informational fields (then every image it reads is intact)
    assert counts["restore_detected"] + counts["restore_clean_error"] + \
        counts["restore_ok_checksum_image_only"] == 200
    assert counts["restore_detected"] >= 190       # the checksums name nearly every damage
