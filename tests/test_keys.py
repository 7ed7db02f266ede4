"""BIP32 derivation of per-channel keys, against BIP32's test vector 1."""

import stat

import pytest

from gateway.keys import MasterKey

SEED = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


def test_bip32_vector_1_master_and_first_hardened_child():
    key = MasterKey(SEED)
    # BIP32 test vector 1, chain m and m/0H.
    assert key._key.hex() == "e8f32e723decf4051aefac8e2c93c9c5b214313817cdb01a1494b917c8436b35"
    assert key.derive_hardened(0).hex() == (
        "edb2e14f9ee77d26dd93b4ecede8d16ed408ce149b6cd80b0715a2d911a0afea"
    )
    priv, pub = key.channel_key(0)
    assert pub.hex() == "035a784662a4a20a65bf6aab9ae98a6c068a81c52e4b032c0fb5400c706cfccc56"
    assert key.channel_key(1)[0] != priv


def test_seed_file_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "d" / "master.key"
    first = MasterKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert MasterKey.load_or_create(path).derive_hardened(5) == first.derive_hardened(5)
    assert "secret" in repr(first)


def test_bad_seed_file_is_a_clear_error(tmp_path):
    path = tmp_path / "master.key"
    path.write_text("not hex")
    with pytest.raises(ValueError, match="does not hold"):
        MasterKey.load_or_create(path)
    with pytest.raises(ValueError):
        MasterKey(b"short")
    with pytest.raises(ValueError):
        MasterKey(SEED).derive_hardened(-1)


def test_gateways_starting_together_share_one_seed(tmp_path):
    """Several processes (``--workers``) may create the seed at once: all get the
    one seed that was written whole, none overwrites it."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "d" / "master.key"
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: MasterKey.load_or_create(path), range(32)))
    assert len({k.channel_key(1)[1] for k in keys}) == 1
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o600
