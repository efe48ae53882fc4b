"""``signing-agent completion bash|zsh|fish``: shell completion scripts, generated from the CLI's own parser.

The parser is walked into a table: for each command path (``""``, ``"sign"``, ``"recovery status"``...) its
subcommands, its options, the options that take a value, and the choices of those that have them. Each shell's
script is that table plus a small driver that finds the command path in the words typed so far. A command or
option added to ``cli.build_parser`` is completed without touching this module.

Install (the README shows it too)::

    signing-agent completion bash > ~/.local/share/bash-completion/completions/signing-agent
    signing-agent completion zsh > ~/.zfunc/_signing-agent      # with fpath=(~/.zfunc $fpath) before compinit
    signing-agent completion fish > ~/.config/fish/completions/signing-agent.fish
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field

PROG = "signing-agent"


@dataclass
class Command:
    """One command path of the parser, as completion sees it."""

    path: str
    help: str = ""
    subcommands: dict[str, str] = field(default_factory=dict)
    """Name to help line."""
    options: dict[str, str] = field(default_factory=dict)
    """Option string to help line."""
    takes_value: set[str] = field(default_factory=set)
    choices: dict[str, list[str]] = field(default_factory=dict)
    """Choices of an option, or of the positional (key ``""``)."""


def _help(text: str | None) -> str:
    return " ".join((text or "").split()).replace("%(default)s", "").split(". ")[0][:80]


def walk(parser: argparse.ArgumentParser, path: str = "", help_text: str = "") -> Iterator[Command]:
    """Every command path of ``parser``, depth first."""
    command = Command(path, help_text)
    nested: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                command.subcommands[name] = _help(helps.get(name))
                nested.append((f"{path} {name}".strip(), sub, helps.get(name, "")))
        elif action.option_strings:
            for option in action.option_strings:
                command.options[option] = _help(action.help)
                if action.nargs != 0:
                    command.takes_value.add(option)
                    if action.choices:
                        command.choices[option] = [str(c) for c in action.choices]
        elif action.choices:
            command.choices[""] = [str(c) for c in action.choices]
    yield command
    for sub_path, sub, sub_help in nested:
        yield from walk(sub, sub_path, _help(sub_help))


def _sh_words(words: list[str]) -> str:
    return " ".join(words)


def _sh_tables(commands: list[Command]) -> str:
    """The table as shell functions that set ``reply`` (the same text for bash and zsh)."""

    def case(name: str, arms: list[tuple[str, str]]) -> list[str]:
        lines = [f"_signing_agent_{name}() {{", '    case "$1" in']
        lines += [f'        "{key}") reply=({value}) ;;' for key, value in arms]
        lines += ["        *) reply=() ;;", "    esac", "}"]
        return lines

    subs = [(c.path, _sh_words(list(c.subcommands))) for c in commands if c.subcommands]
    words = [(c.path, _sh_words([*c.subcommands, *c.choices.get("", []), *sorted(c.options)])) for c in commands]
    valued = [(c.path, _sh_words(sorted(c.takes_value))) for c in commands if c.takes_value]
    choices = [
        (f"{c.path}|{option}", _sh_words(options))
        for c in commands
        for option, options in sorted(c.choices.items())
        if option
    ]
    lines = [
        *case("subcommands", subs),
        *case("words", words),
        *case("valued", valued),
        *case("choices", choices),
    ]
    return "\n".join(lines) + "\n"


_BASH_DRIVER = """\
_signing_agent_path() {  # the command path in the words before the cursor
    local i w cmdpath=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        _signing_agent_subcommands "$cmdpath"
        if [[ " ${reply[*]} " == *" $w "* ]]; then cmdpath="${cmdpath:+$cmdpath }$w"; fi
    done
    REPLY="$cmdpath"
}

_signing_agent() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" reply REPLY
    _signing_agent_path
    local cmdpath="$REPLY"
    _signing_agent_choices "$cmdpath|$prev"
    if ((${#reply[@]})); then
        COMPREPLY=($(compgen -W "${reply[*]}" -- "$cur"))
        return
    fi
    _signing_agent_valued "$cmdpath"
    if [[ " ${reply[*]} " == *" $prev "* ]]; then
        COMPREPLY=()  # a value: files, by -o default
        return
    fi
    _signing_agent_words "$cmdpath"
    COMPREPLY=($(compgen -W "${reply[*]}" -- "$cur"))
}

complete -o default -F _signing_agent signing-agent
"""

_ZSH_DRIVER = """\
_signing-agent() {
    local i w cmdpath="" reply
    for ((i = 2; i < CURRENT; i++)); do
        w="${words[i]}"
        _signing_agent_subcommands "$cmdpath"
        if (( ${reply[(Ie)$w]} )); then cmdpath="${cmdpath:+$cmdpath }$w"; fi
    done
    local prev="${words[CURRENT-1]}"
    _signing_agent_choices "$cmdpath|$prev"
    if (( ${#reply} )); then
        compadd -- "${reply[@]}"
        return
    fi
    _signing_agent_valued "$cmdpath"
    if (( ${reply[(Ie)$prev]} )); then
        _files
        return
    fi
    _signing_agent_words "$cmdpath"
    compadd -- "${reply[@]}"
    [[ "${words[CURRENT]}" == -* ]] || _files
}

if [ "$funcstack[1]" = "_signing-agent" ]; then
    _signing-agent "$@"
else
    compdef _signing-agent signing-agent
fi
"""


def _fish(commands: list[Command]) -> str:
    def q(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    lines = [
        f"# fish completion for {PROG} (generated by '{PROG} completion fish')",
        "function __signing_agent_subcommands",
        "    switch $argv[1]",
    ]
    for c in commands:
        if c.subcommands:
            lines += [f"        case {q(c.path)}", f"            echo {' '.join(c.subcommands)}"]
    lines += [
        "    end",
        "end",
        "function __signing_agent_path",
        '    set -l cmdpath ""',
        "    for w in (commandline -opc)[2..-1]",
        '        if contains -- $w (string split " " (__signing_agent_subcommands "$cmdpath"))',
        '            set cmdpath (string trim -- "$cmdpath $w")',
        "        end",
        "    end",
        '    echo "$cmdpath"',
        "end",
        "function __signing_agent_at",
        "    set -l cmdpath (__signing_agent_path)",
        '    test "$cmdpath" = "$argv[1]"',
        "end",
    ]
    for c in commands:
        at = f"-n {q('__signing_agent_at ' + q(c.path))}"
        for name, text in c.subcommands.items():
            lines.append(f"complete -c {PROG} {at} -f -a {q(name)} -d {q(text)}")
        for choice in c.choices.get("", []):
            lines.append(f"complete -c {PROG} {at} -f -a {q(choice)}")
        for option, text in sorted(c.options.items()):
            flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
            value = ""
            if option in c.choices:
                value = f" -x -a {q(' '.join(c.choices[option]))}"
            elif option in c.takes_value:
                value = " -r"
            lines.append(f"complete -c {PROG} {at} {flag}{value} -d {q(text)}")
    return "\n".join(lines) + "\n"


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (bash, zsh or fish)."""
    commands = list(walk(parser))
    if shell == "bash":
        header = f"# bash completion for {PROG} (generated by '{PROG} completion bash')\n"
        return header + _sh_tables(commands) + "\n" + _BASH_DRIVER
    if shell == "zsh":
        header = f"#compdef {PROG}\n# zsh completion for {PROG} (generated by '{PROG} completion zsh')\n"
        return header + _sh_tables(commands) + "\n" + _ZSH_DRIVER
    if shell == "fish":
        return _fish(commands)
    raise ValueError(f"no completion for the shell {shell!r}")
