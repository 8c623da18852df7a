# TCP connection states, flag classes and the transition table of Linux
# nf_conntrack_proto_tcp.c (tcp_conntracks[dir][index][state]); nothing else lives here.
# Window tracking is in track.py; this file is only the state machine as data.
"""TCP state machine, as a table.

Rule 1: a packet's *flag class* is the first of RST, SYN+ACK, SYN, FIN, ACK that its
flags contain (``flag_class``), else NONE.
Rule 2: the next state is ``TRANSITIONS[dir][flag_class][state]``. Two outcomes are not
states: ``IV`` (invalid: the packet is INVALID, the conn keeps its state) and ``IG``
(ignore: the packet passes, the conn keeps its state and windows).

Theory of operation: the table below is Linux's, row by row, with the reason under each
row. Everything around it (reopen on SYN in TIME_WAIT/CLOSE, RST sequence checks,
window tracking, ASSURED, timeouts) is done by the tracking kernel in ``track.py``.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class TcpState(IntEnum):
    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class FlagClass(IntEnum):
    SYN = 0
    SYNACK = 1
    FIN = 2
    ACK = 3
    RST = 4
    NONE = 5


ORIGINAL, REPLY = 0, 1
N_STATES = 10
IV = 10   # invalid
IG = 11   # ignore

sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2 = range(10)
sIV, sIG = IV, IG

# columns:   sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
_ORIGINAL = [
    [sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2],   # syn
    # sNO -> sSS  a SYN opens a connection.
    # sSS -> sSS  retransmitted SYN.
    # sSR/sES/sFW/sCW/sLA -> sIG  SYN on a live conn: maybe a new incarnation; let the
    #              reply (RST or challenge ACK) decide, keep state.
    # sTW/sCL -> sSS  reopen: the tracker kills the old conn and starts over.
    # sS2 -> sS2  SYN retransmitted during simultaneous open.
    [sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR],   # synack
    # sNO -> sIV  SYN/ACK cannot start a conn.
    # sSS -> sIV  SYN/ACK from the originator without a reply SYN.
    # sSR -> sSR  simultaneous open: originator's SYN/ACK retransmitted.
    # sES..sCL -> sIV  no SYN/ACK from the originator after the handshake.
    # sS2 -> sSR  simultaneous open: the originator answers the reply's SYN.
    [sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV],   # fin
    # sNO/sSS -> sIV  FIN before the handshake finished.
    # sSR/sES -> sFW  originator closes first.
    # sFW -> sLA  both FINs seen (ours second); sCW -> sLA  we close after the peer.
    # sLA -> sLA  retransmitted FIN; sTW -> sTW; sCL -> sCL.
    # sS2 -> sIV  FIN during simultaneous open.
    [sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV],   # ack
    # sNO -> sES  mid-stream pickup (tcp_loose): only possible on creation.
    # sSS -> sIV  ACK before any reply.
    # sSR -> sES  third packet of the handshake.
    # sES -> sES; sFW -> sCW  a close request answered by an ACK; sCW -> sCW.
    # sLA -> sTW  last ACK seen; sTW -> sTW  retransmitted last ACK; sCL -> sCL.
    # sS2 -> sIV  ACK without SYN/ACK during simultaneous open.
    [sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL],   # rst
    # sNO -> sIV  RST cannot start a conn; anything else -> sCL.
    [sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV],   # none
    # no SYN/FIN/ACK/RST: invalid in every state.
]

_REPLY = [
    [sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2],   # syn
    # sSS -> sS2  simultaneous open: the responder sends its own SYN.
    # sTW -> sSS  reopen from the reply side (Linux allows it).
    # sS2 -> sS2  retransmitted simultaneous-open SYN; all else sIV.
    [sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR],   # synack
    # sSS -> sSR  the responder accepts.
    # sSR..sCL -> sIG  retransmitted or late SYN/ACK: pass, keep state.
    # sS2 -> sSR  simultaneous open completes.
    [sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV],   # fin
    # same as the original direction: sSR/sES -> sFW, sFW/sCW -> sLA.
    [sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG],   # ack
    # sSS -> sIG  ACK without SYN from the responder (e.g. to an old incarnation).
    # sSR -> sSR  ACK of a simultaneous-open SYN/ACK.
    # sES -> sES; sFW -> sCW  the responder acks our FIN; sLA -> sTW  last ACK.
    # sS2 -> sIG.
    [sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL],   # rst
    # RST closes from any state but NONE.
    [sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV],   # none
]

TRANSITIONS = np.array([_ORIGINAL, _REPLY], dtype=np.int8)   # [dir][class][state]

TH_FIN, TH_SYN, TH_RST, TH_ACK = 1, 2, 4, 16


def flag_class(flags: int) -> FlagClass:
    """Rule 1 (get_conntrack_index)."""
    if flags & TH_RST:
        return FlagClass.RST
    if flags & TH_SYN:
        return FlagClass.SYNACK if flags & TH_ACK else FlagClass.SYN
    if flags & TH_FIN:
        return FlagClass.FIN
    if flags & TH_ACK:
        return FlagClass.ACK
    return FlagClass.NONE


def next_state(direction: int, flags: int, state: int) -> int:
    """Rule 2 as a Python function (tests, docs)."""
    return int(TRANSITIONS[direction, flag_class(flags), state])


# states a full table may early-drop (tcp_can_early_drop)
EARLY_DROPPABLE = (TcpState.FIN_WAIT, TcpState.LAST_ACK, TcpState.TIME_WAIT, TcpState.CLOSE,
                   TcpState.CLOSE_WAIT)
