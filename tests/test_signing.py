"""Bundle signatures (kubeseg/signing.py): a signed bundle verifies; unsigned, another key's,
altered, added or removed files, and a tampered signature file are refused with the reason."""

import json

import pytest

from kubeseg.signing import SIGNATURE_FILE, SignatureError, generate_keys, sign_bundle, verify_bundle


@pytest.fixture
def keys(tmp_path):
    return generate_keys(tmp_path / "ours"), generate_keys(tmp_path / "theirs")


def _bundle(root):
    (root / "fold_0").mkdir(parents=True)
    (root / "selection.json").write_text('{"members": []}')
    (root / "fold_0" / "checkpoint_final.pth").write_bytes(b"\x00weights" * 100)
    return root


def test_signed_bundle_verifies_and_keys_are_private(tmp_path, keys):
    (private, public), _ = keys
    assert private.stat().st_mode & 0o077 == 0
    b = _bundle(tmp_path / "b")
    sig = sign_bundle(b, private, signed_by="pipeline")
    assert verify_bundle(b, public).key_id == sig.key_id and sig.signed_by == "pipeline"


@pytest.mark.parametrize("attack,reason", [("unsigned", "unsigned"), ("other_key", "unknown_key"),
                                           ("changed_weights", "altered"), ("added_file", "altered"),
                                           ("removed_file", "altered"), ("forged_key_id", "altered"),
                                           ("garbage_signature", "malformed")])
def test_refusals_name_the_reason(tmp_path, keys, attack, reason):
    (private, public), (other_private, _) = keys
    b = _bundle(tmp_path / "b")
    sign_bundle(b, other_private if attack in ("other_key", "forged_key_id") else private)
    if attack == "unsigned":
        (b / SIGNATURE_FILE).unlink()
    elif attack == "changed_weights":
        (b / "fold_0" / "checkpoint_final.pth").write_bytes(b"\x01evil" * 100)
    elif attack == "added_file":
        (b / "fold_0" / "extra.py").write_text("import os")
    elif attack == "removed_file":
        (b / "selection.json").unlink()
    elif attack == "forged_key_id":  # another key's signature relabelled with our key id
        ours = verify_bundle(_sign_copy(tmp_path, private), public).key_id
        doc = json.loads((b / SIGNATURE_FILE).read_text())
        doc["key_id"] = ours
        (b / SIGNATURE_FILE).write_text(json.dumps(doc))
    elif attack == "garbage_signature":
        (b / SIGNATURE_FILE).write_text("{not json")
    with pytest.raises(SignatureError) as e:
        verify_bundle(b, public)
    assert e.value.reason == reason, str(e.value)


def _sign_copy(tmp_path, private):
    c = _bundle(tmp_path / "copy")
    sign_bundle(c, private)
    return c


def test_predict_refuses_a_bundle_the_key_has_not_signed(tmp_path, keys, capsys):
    from kubeseg.cli import main

    (private, public), (other, _) = keys
    b = _bundle(tmp_path / "b")
    sign_bundle(b, other)
    image = tmp_path / "case.nii.gz"
    image.write_bytes(b"not read: the signature is checked first")
    assert main(["predict", "-i", str(image), "-o", str(tmp_path / "out"), "-m", str(b), "--public-key", str(public)]) == 2
    err = capsys.readouterr().err
    assert "signed by key" in err and str(b) in err
    assert not (tmp_path / "out").exists()
