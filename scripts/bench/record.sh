# Sourced by the benchmark scripts: replaces the section between `<!-- NAME:start -->` and
# `<!-- NAME:end -->` in docs/benchmarks.md (appending the markers if missing) with a file.
#   record_section NAME SECTION_FILE
record_section() {
  local name=$1 section=$2 file=docs/benchmarks.md
  local start="<!-- $name:start -->" end="<!-- $name:end -->" out
  out=$(mktemp)
  grep -qxF "$start" "$file" || printf '\n%s\n%s\n' "$start" "$end" >>"$file"
  awk -v start="$start" -v end="$end" -v section="$section" '
    $0 == start { print; while ((getline line < section) > 0) print line; skipping = 1; next }
    $0 == end { skipping = 0 }
    !skipping { print }' "$file" >"$out"
  mv "$out" "$file"
  echo "bench: wrote $file" >&2
}
