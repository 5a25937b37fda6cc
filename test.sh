#!/usr/bin/env bash
# Every test: library in step with the notebooks, the notebooks' own cells, then pytest.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PWD/.venv/bin:$PATH"
if [ -z "${PTM_DATA_DIR:-}" ] && [ -d ../shared/data/medmnist ]; then
  export PTM_DATA_DIR="$(cd ../shared/data/medmnist && pwd)"
fi
echo "test.sh: PTM_DATA_DIR=${PTM_DATA_DIR:-<unset: tests that need real data are skipped>}"
# 1. ptm_nb/ must be exactly what nbdev_export writes from nbs/
nbdev_export
if [ -n "$(git status --porcelain -- ptm_nb 2>/dev/null)" ]; then
  git status --porcelain -- ptm_nb
  echo "test.sh: ptm_nb/ is out of step with nbs/: run nbdev_export and commit" >&2
  exit 1
fi
ptm-nb readme --check
# 2. every notebook, top to bottom, at smoke scale (two notebooks at a time, one thread each: tiny tensors
#    run faster single-threaded, and two workers fill the two cores)
OMP_NUM_THREADS=1 nbdev_test --n_workers 2 --timing
# 3. pytest; exit 5 means no test was collected, which is a failure here (there must be tests)
rc=0; python -m pytest -q -rs tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no test" >&2; exit 1; fi
exit "$rc"
