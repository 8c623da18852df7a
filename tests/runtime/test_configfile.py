"""Config and rule files: errors are one line with file:line, never a traceback."""
from __future__ import annotations

import pytest

from shardct.errors import ConfigError
from workers.cli import main
from workers.configfile import load


@pytest.mark.parametrize("body,line,want", [
    ("[conntrack]\ndrop_invalid = true\nmax_conns = 2147483648\n", 3, "max_conns = 2147483648: want 1..67108864"),
    ("# limits\n[conntrack]\n\nn_buckets = 1099511627776\n", 4, "n_buckets"),
    ("[conntrack]\nn_buckets = 1000\n", 2, "power of two"),
    ("[conntrack]\nevent_buffer = 9223372036854775807\n", 2, "event_buffer"),
    ("[conntrack]\nmax_conns = 1e11\n", 2, "want a positive integer"),
    ("[conntrack]\nmax_conns = 10\n[conntrack.timeouts]\nudp = -3\n", 4, "timeouts.udp"),
    ("[conntrack]\ntimeouts.icmp = 0\n", 2, "timeouts.icmp"),
    ("[nat]\nrules = 5\n", 2, "want a file name"),
    ("[neighbours]\n\"10.0.0.2\" = \"02:00\"\n", 2, "want six hex bytes"),
    ("[neighbours]\n\"10.0.0.2\" = \"02:00:00:00:00:02\"\nrouter = \"x\"\n", 3,
     "not an IP address"),
])
def test_config_value_errors_name_file_and_line(tmp_path, body, line, want):
    (tmp_path / "c.toml").write_text(body)
    with pytest.raises(ConfigError) as ei:
        load(tmp_path / "c.toml")
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path / 'c.toml'}:{line}: ") and want in msg, \
        f"got {msg!r}, want 'c.toml:{line}: ...{want}...'"


def test_non_utf8_files_name_file_and_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes(b"[conntrack]\n# caf\xe9\nmax_conns = 10\n")
    with pytest.raises(ConfigError, match=r"c\.toml:2: not UTF-8 \(byte 0xe9 at column 6\)"):
        load(tmp_path / "c.toml")
    (tmp_path / "n.rules").write_bytes(b"*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o \xff\xfe -j MASQUERADE\nCOMMIT\n")
    (tmp_path / "d.toml").write_text('[nat]\nrules = "n.rules"\n')
    rc = main(["replay", "-c", str(tmp_path / "d.toml"), "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "n.rules:3: not UTF-8" in err, (rc, err)
