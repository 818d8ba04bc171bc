"""Shell completion for busctl, generated from its argparse tree: ``busctl completion bash``
and ``busctl completion zsh`` print a static script that completes verbs, options, option
values with fixed choices, files and directories, and service names (asked of the running
system with ``busctl list -o json`` at completion time, with the --run-dir, --bus and
--credential-file already on the command line).

The completing logic is one POSIX shell function that bash and zsh both run; each shell
only feeds it the words and turns its answer (one candidate a line, or ``@file``/``@dir``)
into candidates."""

from __future__ import annotations

import argparse
import shlex

__all__ = ["SHELLS", "completion_script"]

SHELLS = ("bash", "zsh")


def _spec(action: argparse.Action) -> str:
    """What completes an argument: its choices, and its ``complete`` attribute's words
(``service``, ``file`` and ``dir`` become ``@service``, ``@file``, ``@dir``)."""
    words = [str(c) for c in action.choices] if action.choices else []
    for token in getattr(action, "complete", "").split():
        words.append(f"@{token}" if token in ("service", "file", "dir") else token)
    return " ".join(words)


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _case(entries: dict[str, str], default: str = "") -> str:
    lines = [f"        {pattern}) echo {shlex.quote(value)} ;;" for pattern, value in entries.items() if value]
    return "\n".join(["    case $1 in", *lines, f"        *) echo {shlex.quote(default)} ;;", "    esac"])


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    verbs = _verbs(parser)
    global_opts: list[str] = []
    takes_value: dict[str, str] = {}   # "verb:option" (verb * for global) -> its value spec
    options: dict[str, str] = {}       # verb -> its own options
    positionals: dict[str, str] = {}   # "verb:N" -> spec; "verb:*" for the rest of nargs="*"
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            global_opts += [o for o in action.option_strings if o.startswith("--") or len(action.option_strings) == 1]
            if action.nargs != 0:
                for o in action.option_strings:
                    takes_value[f"*:{o}"] = _spec(action) or "@none"
    global_set = set(global_opts) | {"-h", "--help", "-o"}
    for name, sub in verbs.items():
        own, n = [], 0
        for action in sub._actions:
            if action.option_strings:
                if not set(action.option_strings) & global_set:
                    own += [o for o in action.option_strings if o.startswith("--") or len(action.option_strings) == 1]
                    if action.nargs != 0:
                        for o in action.option_strings:
                            takes_value[f"{name}:{o}"] = _spec(action) or "@none"
            else:
                key = f"{name}:*" if action.nargs in ("*", "+") else f"{name}:{n}"
                positionals[key] = _spec(action) or "@none"
                n += 1
        options[name] = " ".join(own)
    value_cases = "\n".join(f"        {shlex.quote(k)}) echo {shlex.quote(v)}; return 0 ;;"
                            for k, v in sorted(takes_value.items(), key=lambda kv: kv[0].startswith("*")))
    common = f"""\
_busctl_value_spec() {{
    # $1 verb, $2 option: prints what completes the option's value; fails for a flag
    case "$1:$2" in
{value_cases}
    esac
    case "*:$2" in
{value_cases}
    esac
    return 1
}}

_busctl_verb_options() {{
{_case(options)}
}}

_busctl_positional_spec() {{
    # $1 "verb:N" (N counts the verb's positional words before this one)
    case $1 in
{chr(10).join(f"        {shlex.quote(k)}) echo {shlex.quote(v)}; return ;;" for k, v in positionals.items())}
    esac
    case ${{1%%:*}}:* in
{chr(10).join(f"        {shlex.quote(k)}) echo {shlex.quote(v)}; return ;;" for k, v in positionals.items() if k.endswith(':*'))}
    esac
}}

_busctl_services() {{
    # the names of the services of the running system, as `busctl list -o json` gives them
    local prog=$1 rundir=$2 bus=$3 cred=$4
    set --
    if [ -n "$rundir" ]; then set -- "$@" --run-dir "$rundir"; fi
    if [ -n "$bus" ]; then set -- "$@" --bus "$bus"; fi
    if [ -n "$cred" ]; then set -- "$@" --credential-file "$cred"; fi
    "$prog" list -o json --timeout 2 --deadline 2 "$@" 2>/dev/null \\
        | grep -o '"name":"[^"]*"' | cut -d'"' -f4
}}

_busctl_candidates() {{
    # $1 the index of the word being completed (0 is the command), then every word;
    # prints the candidates, one a line, or @file / @dir
    local cword=$1 prog=$2 i=1 verb= npos=0 pending= prev= w= cur= spec= rundir= bus= cred= word=
    shift 2
    while [ $# -gt 0 ]; do
        w=$1
        shift
        if [ "$i" -eq "$cword" ]; then
            cur=$w
            break
        fi
        i=$((i + 1))
        if [ "$w" = "=" ]; then pending=1; continue; fi
        if [ -n "$pending" ]; then
            pending=
            case $prev in
                --run-dir) rundir=$w ;;
                --bus) bus=$w ;;
                --credential-file) cred=$w ;;
            esac
            prev=$w
            continue
        fi
        case $w in
            --run-dir=*) rundir=${{w#*=}} ;;
            --bus=*) bus=${{w#*=}} ;;
            --credential-file=*) cred=${{w#*=}} ;;
            --*=*) ;;
            -*) if _busctl_value_spec "$verb" "$w" >/dev/null; then pending=1; fi ;;
            *) if [ -z "$verb" ]; then verb=$w; else npos=$((npos + 1)); fi ;;
        esac
        prev=$w
    done
    if [ -n "$pending" ]; then
        spec=$(_busctl_value_spec "$verb" "$prev")
    else
        case $cur in
            -*)
                if [ -z "$verb" ]; then
                    echo {shlex.quote(" ".join(global_opts))} | tr ' ' '\\n'
                else
                    echo {shlex.quote(" ".join(o for o in global_opts if o != "--version"))} \\
                        $(_busctl_verb_options "$verb") | tr ' ' '\\n'
                fi
                return ;;
        esac
        if [ -z "$verb" ]; then
            echo {shlex.quote(" ".join(verbs))} | tr ' ' '\\n'
            return
        fi
        spec=$(_busctl_positional_spec "$verb:$npos")
    fi
    for word in $(echo "$spec"); do
        case $word in
            @service) _busctl_services "$prog" "$rundir" "$bus" "$cred" ;;
            @file|@dir) echo "$word" ;;
            @none) ;;
            *) echo "$word" ;;
        esac
    done
}}
"""
    if shell == "bash":
        return f"""\
# bash completion for busctl (edgebus), generated by `busctl completion bash`.
# Load it with:  source <(busctl completion bash)
# or install it: busctl completion bash > ~/.local/share/bash-completion/completions/busctl
{common}
_busctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} out
    [ "$cur" = "=" ] && cur=
    out=$(_busctl_candidates "$COMP_CWORD" "${{COMP_WORDS[@]}}")
    case $out in
        @file) COMPREPLY=($(compgen -f -- "$cur")) ;;
        @dir) COMPREPLY=($(compgen -d -- "$cur")) ;;
        *) COMPREPLY=($(compgen -W "$out" -- "$cur")) ;;
    esac
}}
complete -o filenames -F _busctl busctl
"""
    return f"""\
#compdef busctl
# zsh completion for busctl (edgebus), generated by `busctl completion zsh`.
# Load it with:  source <(busctl completion zsh)     (after compinit)
# or install it: busctl completion zsh > "${{fpath[1]}}/_busctl"
{common}
_busctl() {{
    local out
    out=$(_busctl_candidates $((CURRENT - 1)) "${{words[@]}}")
    case $out in
        @file) _files ;;
        @dir) _files -/ ;;
        *) compadd -- ${{(f)out}} ;;
    esac
}}
if [ "${{funcstack[1]}}" = "_busctl" ]; then
    _busctl "$@"
else
    compdef _busctl busctl
fi
"""
