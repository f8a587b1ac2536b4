"""The dashboard's viewer token (``taskguard.dashboard.access``): its file's rules and the header check."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from taskguard.dashboard.access import MIN_TOKEN_CHARS, TokenFileError, ViewerToken, load_or_create


def test_a_missing_token_file_is_created_0600_in_a_0700_folder_with_a_random_token(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dashboard.token"
    token = load_or_create(path)
    assert len(token) >= 40 and token.isprintable()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create(path) == token  # kept: a restarted dashboard takes the same token
    assert load_or_create(tmp_path / "other.token") != token


def test_a_token_file_written_by_hand_is_read_without_its_line_break(tmp_path: Path) -> None:
    path = tmp_path / "viewer.token"
    path.write_text("a-token-of-enough-length\n")
    path.chmod(0o600)
    assert load_or_create(path) == "a-token-of-enough-length"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o606])
def test_a_token_file_that_group_or_others_may_open_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "viewer.token"
    path.write_text("a-token-of-enough-length")
    path.chmod(mode)
    with pytest.raises(TokenFileError, match=f"group or others may open it \\(mode 0{mode:o}\\)"):
        load_or_create(path)


def test_a_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = tmp_path / "viewer.token"
    path.write_text("a-token-of-enough-length")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(TokenFileError, match="belongs to uid 65534"):
        load_or_create(path)


def test_a_symlinked_token_file_is_refused_and_never_followed_to_create(tmp_path: Path) -> None:
    target = tmp_path / "target.token"
    target.write_text("a-token-of-enough-length")
    target.chmod(0o600)
    (tmp_path / "link.token").symlink_to(target)
    with pytest.raises(TokenFileError):
        load_or_create(tmp_path / "link.token")
    dangling = tmp_path / "dangling.token"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(TokenFileError):
        load_or_create(dangling)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777])
def test_a_folder_that_others_may_write_is_refused_they_could_swap_the_file(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(TokenFileError, match="group or others may write it"):
        load_or_create(folder / "viewer.token")
    assert not (folder / "viewer.token").exists()


@pytest.mark.parametrize("content", ["", "short", "two words of enough length", "x" * (MIN_TOKEN_CHARS - 1)])
def test_a_token_too_short_or_not_one_word_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "viewer.token"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(TokenFileError, match="must hold one token"):
        load_or_create(path)


def test_the_viewer_token_admits_its_bearer_header_only_and_never_shows_itself() -> None:
    viewer = ViewerToken("a-token-of-enough-length", Path("/x/viewer.token"))
    assert viewer.admits("Bearer a-token-of-enough-length")
    assert viewer.admits("bearer  a-token-of-enough-length ")
    for header in ("", "a-token-of-enough-length", "Bearer a-token-of-enough-lengt", "Basic a-token-of-enough-length"):
        assert not viewer.admits(header), header
    assert "a-token" not in repr(viewer)


def test_a_proof_is_the_hmac_of_the_pages_nonce_and_a_malformed_nonce_is_refused() -> None:
    import hashlib
    import hmac

    viewer = ViewerToken("a-token-of-enough-length", Path("/x/viewer.token"))
    nonce = "0123456789abcdef" * 2
    expected = hmac.new(b"a-token-of-enough-length", f"taskguard-dashboard-proof:{nonce}".encode(), hashlib.sha256)
    assert viewer.proof(nonce) == expected.hexdigest()
    assert viewer.proof(nonce) != ViewerToken("another-token-of-length", Path("/y")).proof(nonce)
    for bad in ("", "0123", nonce.upper(), nonce + "0", "g" * 32):
        with pytest.raises(ValueError, match="nonce"):
            viewer.proof(bad)
