"""Per-key policy rules in the configuration: [[rules]] tables, the default rule, and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskguard.config import ConfigError, describe_rule
from taskguard.guard.model import ConflictPolicy, FailureHandling, KeyRule
from tests.unit.test_config import load

RULES = """
expired_requires_approval = true
lock_delay = "5s"

[[rules]]
name = "deploys"
match = "*::deploy"
failure = "reopen"
max_hold = "2h"
on_conflict = "join"

[[rules]]
match = "agent:ops:*"
lock_delay = 0
expired_requires_approval = false
"""


def test_rules_are_read_in_order_and_inherit_what_they_do_not_set_from_the_default_rule(tmp_path: Path) -> None:
    settings = load(tmp_path, toml=RULES)
    policy = settings.policy

    default = KeyRule(expired_requires_approval=True, lock_delay_s=5.0)
    assert policy.default_rule == default
    assert policy.rules == (
        KeyRule(
            name="deploys",
            match="*::deploy",
            on_conflict=ConflictPolicy.JOIN,
            failure=FailureHandling.REOPEN,
            expired_requires_approval=True,
            lock_delay_s=5.0,
            max_hold_s=7200.0,
        ),
        KeyRule(name="rules[1]", match="agent:ops:*", lock_delay_s=0.0, expired_requires_approval=False),
    )
    # First match wins: an ops deploy is a deploy.
    assert policy.rule_for("agent:ops::deploy").name == "deploys"
    assert policy.rule_for("agent:ops::report").name == "rules[1]"
    assert policy.rule_for("agent:main::report") == default


def test_flags_and_variables_set_the_default_rule(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"TASKGUARD_FAILURE": "reopen"}, flags=("--lock-delay", "30s", "--max-hold", "1h"))

    assert settings.default_rule == KeyRule(failure=FailureHandling.REOPEN, lock_delay_s=30.0, max_hold_s=3600.0)


def test_a_rule_can_undo_the_default_rules_max_hold(tmp_path: Path) -> None:
    settings = load(tmp_path, toml='max_hold = "1h"\n[[rules]]\nmatch = "long::*"\nmax_hold = "none"\n')

    assert settings.policy.rule_for("long::x").max_hold_s is None
    assert settings.policy.rule_for("short::x").max_hold_s == 3600.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'name = "deploys"\nmatch = "*::deploy"\nlock_delay = "soon"',
            "rules[0] ('deploys').lock_delay ({source}): must be a duration >= 0, got 'soon'",
        ),
        (
            'match = "x*"\nfailure = "retry"',
            "rules[0].failure ({source}): must be require_approval or reopen, got 'retry'",
        ),
        (
            'match = "x*"\non_conflict = "wait"',
            "rules[0].on_conflict ({source}): must be reject, join, queue, keep-newest or supersede, got 'wait'",
        ),
        (
            'match = "x*"\nmax_hold = "-1s"',
            "rules[0].max_hold ({source}): must be a duration > 0, or none, got '-1s'",
        ),
        (
            'match = "x*"\nmax_ttl = "1h"',
            "rules[0] ({source}): unknown setting 'max_ttl'; a rule may set match, name, abandoned_requires_approval, "
            "allow_supersede, expired_requires_approval, failure, lock_delay, max_hold, max_holders, max_queue, "
            "max_wait, on_conflict, supersede_grace",
        ),
        (
            'match = "x*"\nmax_holders = 0',
            "rules[0].max_holders ({source}): must be a whole number from 1 to 64, got 0",
        ),
        (
            'match = "x*"\nmax_holders = 65',
            "rules[0].max_holders ({source}): must be a whole number from 1 to 64, got 65",
        ),
        (
            'name = "pool"\nmatch = "x*"\nmax_holders = 3\nallow_supersede = true',
            "rule 'pool': allow_supersede needs max_holders = 1 (got 3): with several runs holding a key, a "
            "superseding caller would not say which to stop",
        ),
        (
            'name = "no-match"',
            "rules[0] ('no-match').match ({source}): is required: a glob of task keys, such as \"agent:ops:*\" "
            '(a prefix) or "*::deploy"',
        ),
        (
            'name = "default"\nmatch = "x*"',
            "rules[0] ('default').name ({source}): 'default' is taken; each rule needs its own name",
        ),
    ],
)
def test_a_bad_rule_is_refused_at_start_naming_the_rule_and_the_setting(
    tmp_path: Path, table: str, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, toml=f"[[rules]]\n{table}\n")

    assert str(refused.value) == message.format(source=f"config file {tmp_path / 'taskguard.toml'}")


def test_two_rules_with_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\[1\] \('a'\)\.name .*'a' is taken"):
        load(tmp_path, toml='[[rules]]\nname = "a"\nmatch = "x*"\n[[rules]]\nname = "a"\nmatch = "y*"\n')


def test_rules_that_are_not_tables_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules must be an array of tables \(\[\[rules\]\]\)"):
        load(tmp_path, toml='rules = "all"\n')


def test_a_rule_makes_a_key_a_semaphore_and_doctor_says_so(tmp_path: Path) -> None:
    settings = load(tmp_path, toml='[[rules]]\nname = "pool"\nmatch = "batch::*"\nmax_holders = 4\n')

    assert settings.policy.rule_for("batch::x").max_holders == 4
    assert settings.policy.rule_for("other::x").max_holders == 1
    assert "up to 4 holders at once" in describe_rule(settings.policy.rule_for("batch::x"))


def test_a_semaphore_is_accepted_on_the_etcd_store(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        toml='store = "etcd://127.0.0.1:2379"\nmax_holders = 2\n[[rules]]\nname = "pool"\nmatch = "batch::*"\n'
        "max_holders = 8\n",
    )

    assert settings.policy.rule_for("other::x").max_holders == 2
    assert settings.policy.rule_for("batch::x").max_holders == 8
