#!/usr/bin/env bash
# Helpers the launchers source: errors, dry runs (DRY_RUN=1 prints each command shell-quoted, runs nothing).
# shellcheck disable=SC2034  # (sourced: the callers use what is defined here)

die() {
  echo "$0: $*" >&2
  exit 2
}

require_int() {
  # $1: variable name.
  [[ "${!1}" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, not '${!1}'"
}

is_dry_run() {
  [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]
}

shell_quote() {
  # The arguments as one line that bash reads back into the same words.
  local IFS=' ' arg
  local -a out=()
  for arg in "$@"; do
    if [[ -n "${arg}" && "${arg}" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      out+=("${arg}")
    elif [[ "${arg}" == *[[:cntrl:]]* ]]; then
      printf -v arg '%q' "${arg}"  # bash's $'...': every command stays on one line
      out+=("${arg}")
    elif [[ "${arg}" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      arg="${BASH_REMATCH[2]}"
      out+=("${BASH_REMATCH[1]}'${arg//\'/\'\\\'\'}'")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

run() {
  if is_dry_run; then
    printf '%s\n' "$(shell_quote "$@")"
  else
    "$@"
  fi
}
