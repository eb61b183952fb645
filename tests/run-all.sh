#!/usr/bin/env bash
# The project's one test command (README.md gives it; .ci/run calls it).
# Installs DCMTK and Orthanc with apt-get if they are missing and we are root, the package
# with its test extras, builds the native twins in place (an error if they do not build), then
# runs the suite on the native twins, and the receive-path tests again on the pure-Python twins
# (FASTROUTE_NO_EXTENSIONS=1, "not slow" tests only, to stay within CI time).
# Extra arguments go to both pytest runs, e.g. `bash tests/run-all.sh -x -q`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if { [ ! -x /usr/bin/storescp ] || [ ! -x /usr/sbin/Orthanc ] || [ ! -x /usr/bin/chromedriver ]; } \
        && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # The orthanc package would start a system Orthanc (ports 4242/8042); tests pick free
    # ports anyway, but forbid service starts during the install (policy-rc.d).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dcmtk orthanc chromium chromium-driver
fi

"$PYTHON" -m pip install -e '.[test]'
# build_ext --inplace runs outside pip's isolated build environment, so it needs the Cython
# that [build-system] pins; read the pin from pyproject.toml to keep one source of truth.
cython_req="$("$PYTHON" -c 'import tomllib
reqs = tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]
print(next(r for r in reqs if r.lower().startswith("cython")))')"
"$PYTHON" -m pip install "$cython_req"
FASTROUTE_REQUIRE_EXTENSIONS=1 "$PYTHON" setup.py build_ext --inplace

echo "== pytest: native twins =="
FASTROUTE_REQUIRE_EXTENSIONS=1 "$PYTHON" -m pytest "$@"
# The pure-Python twins again, on the tests whose code paths run them: the peek and structure
# check (receive, routing, route-test, transcoding) end to end. The rest of the suite (Q/R,
# TLS, commitment, users, the operations plane) never calls a twin, so a second pass over it
# would only double CI time; the property tests above already hold the twins equal.
TWIN_TESTS=(tests/test_peek.py tests/test_attrs.py tests/test_structure.py tests/test_transcode.py
            tests/test_scp.py tests/test_scp_defences.py tests/test_fuzz_scp.py tests/test_router.py
            tests/test_stream.py tests/test_poison.py tests/test_moves.py tests/test_spool.py
            tests/test_schedule.py tests/test_cli.py tests/test_spool_shards.py)
echo "== pytest: pure-Python twins (FASTROUTE_NO_EXTENSIONS=1), receive-path tests =="
FASTROUTE_NO_EXTENSIONS=1 "$PYTHON" -m pytest -m "not slow" "${TWIN_TESTS[@]}" "$@"
