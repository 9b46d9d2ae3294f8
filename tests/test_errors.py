"""EDVS error codes (the module's list) and DvkError behaviour."""

from __future__ import annotations

import pickle
import re

import pytest

from dvk_cffi import errors as E
from dvk_cffi.errors import DvkError

# the module's error list, transcribed (name code; ...)
SPEC = """
EDVSGENERIC -99; EDVSPERM -1; EDVSNOENT -2; EDVSSRCH -3; EDVSINTR -4; EDVSIO -5; EDVSNXIO -6;
EDVS2BIG -7; EDVSNOEXEC -8; EDVSBADF -9; EDVSCHILD -10; EDVSAGAIN -11; EDVSNOMEM -12; EDVSACCES
-13; EDVSFAULT -14; EDVSNOTBLK -15; EDVSBUSY -16; EDVSEXIST -17; EDVSXDEV -18; EDVSNODEV -19;
EDVSNOTDIR -20; EDVSISDIR -21; EDVSINVAL -22; EDVSNFILE -23; EDVSMFILE -24; EDVSNOTTY -25;
EDVSTXTBSY -26; EDVSFBIG -27; EDVSNOSPC -28; EDVSSPIPE -29; EDVSROFS -30; EDVSMLINK -31;
EDVSPIPE -32; EDVSDOM -33; EDVSRANGE -34; EDVSDEADLK -35; EDVSNAMETOOLONG -36; EDVSNOLCK -37;
EDVSNOSYS -38; EDVSNOTEMPTY -39; EDVSLOOP -40; EDVSPACKSIZE -50; EDVSOUTOFBUFS -51; EDVSBADIOCTL
-52; EDVSBADMODE -53; EDVSWOULDBLOCK -54; EDVSBADDEST -55; EDVSDSTNOTRCH -56; EDVSISCONN -57;
EDVSADDRINUSE -58; EDVSCONNREFUSED -59; EDVSCONNRESET -60; EDVSTIMEDOUT -61; EDVSURG -62;
EDVSNOURG -63; EDVSNOTCONN -64; EDVSSHUTDOWN -65; EDVSNOCONN -66; EDVSAFNOSUPPORT -67;
EDVSPROTONOSUPPORT -68; EDVSPROTOTYPE -69; EDVSINPROGRESS -70; EDVSADDRNOTAVAIL -71; EDVSALREADY
-72; EDVSMSGSIZE -73; EDVSNOTSOCK -74; EDVSNOPROTOOPT -75; EDVSLOCKED -101; EDVSBADCALL -102;
EDVSBADSRCDST -103; EDVSCALLDENIED -104; EDVSDEADSRCDST -105; EDVSNOTREADY -106; EDVSBADREQUEST
-107; EDVSSRCDIED -108; EDVSDSTDIED -109; EDVSTRAPDENIED -110; EDVSDONTREPLY -201; EDVSERRCODE
-300; EDVSBADNODEID -301; EDVSBADDCID -302; EDVSDCNOTRUN -303; EDVSBADPROC -304; EDVSBADPID
-305; EDVSENDPOINT -306; EDVSNOPROXY -307; EDVSRMTPROC -308; EDVSLCLPROC -309; EDVSNOTBIND -310;
EDVSPROXYRUN -311; EDVSACKDST -312; EDVSACKSRC -313; EDVSACKWAIT -314; EDVSNODEBUSY -315;
EDVSNONODE -316; EDVSDVSBUSY -317; EDVSDVSINIT -318; EDVSNODCNODE -319; EDVSPROCRUN -320;
EDVSNOMSG -321; EDVSDCRUN -323; EDVSPROCSTS -324; EDVSNODEFREE -325; EDVSDCNODE -326;
EDVSBADPROXY -327; EDVSONCOPY -328; EDVSENQUEUED -329; EDVSOVERRUN -330; EDVSBADOWNER -331;
EDVSMIGRATE -332; EDVSPROXYFREE -333; EDVSGRPLEADER -334; EDVSPRIVILEGES -335; EDVSBINDTYPE
-336; EDVSSLOTUSED -337; EDVSBADRANGE -338; EDVSBADVALUE -339; EDVSBADDIR -340; EDVSBADFILE
-341; EDVSRSCBUSY -342; EDVSNAMESIZE -343; EDVSALLOCMEM -344; EDVSPROXYID -345; EDVSREPLPROC
-346; EDVSALIGN -347; EDVSWOKENUP -348; EDVSBADTRAMP -349; EDVSUSR2USR -350; EDVSKRN2USR -351;
EDVSUSR2KRN -352; EDVSPRIMARY -401; EDVSNOREPLICA -402; EDVSRESTARTSYS -512;
"""
CODES = {name: int(code) for name, code in re.findall(r"(EDVS\w+)\s+(-\d+);", SPEC)}


def test_spec_transcription_complete():
    # 41 POSIX-like + 26 network + 11 IPC + 52 DVS (-300..-352 without -322) + 3 others
    assert len(CODES) == 133
    assert len(set(CODES.values())) == len(CODES)
    assert -322 not in CODES.values()                 # unused in the spec


@pytest.mark.parametrize(("name", "code"), sorted(CODES.items()))
def test_every_code_present(name, code):
    assert getattr(E, name) == code
    assert E.ERRORS[code][0] == name
    assert E.error_name(code) == name
    assert E.error_message(code)
    cls = DvkError.classes[code]
    assert cls.__name__ == f"{name}_Error"
    assert getattr(E, f"{name}_Error") is cls
    assert issubclass(cls, DvkError)


def test_no_extra_codes():
    assert set(E.ERRORS) == set(CODES.values())


@pytest.mark.parametrize(("name", "code"), sorted(CODES.items()))
def test_for_code(name, code):
    err = DvkError.for_code(code, "bind(0, 10)")
    assert type(err) is DvkError.classes[code]
    assert (err.code, err.name, err.context) == (code, name, "bind(0, 10)")
    assert str(err).startswith("bind(0, 10): ")
    assert name in str(err) and f"({code})" in str(err)


def test_for_code_unknown():
    err = DvkError.for_code(-9999)
    assert type(err) is DvkError
    assert err.code == -9999 and "9999" in err.name
    assert "unknown" in str(err)


def test_catch_by_subclass():
    with pytest.raises(E.EDVSNOTCONN_Error):
        E.check(-64)
    try:
        E.check(-319, "put2lcl")
    except DvkError as exc:
        assert exc.code == -319 and exc.name == "EDVSNODCNODE"
    else:  # pragma: no cover
        pytest.fail("no exception")


def test_check():
    assert E.check(0) == 0
    assert E.check(36) == 36
    assert E.check(27342) == 27342
    for code in (-1, -4, -61, -300, -319, -512):
        with pytest.raises(DvkError) as info:
            E.check(code, "x")
        assert info.value.code == code


def test_check_ep():
    # task endpoints (-1..-35) and anything above EDVSERRCODE are endpoints
    for ep in (0, 10, -1, -2, -35, -36, E.EDVSERRCODE, 27342):
        assert E.check_ep(ep) == ep
    for code in (-301, -319, -352, -401, -512):
        with pytest.raises(DvkError.classes[code]):
            E.check_ep(code, "getep")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling(protocol):
    err = DvkError.for_code(E.EDVSNODCNODE, "add_node(0, 5)")
    back = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert type(back) is E.EDVSNODCNODE_Error
    assert (back.code, back.name, back.context, str(back)) == (
        err.code, err.name, err.context, str(err))
    plain = pickle.loads(pickle.dumps(DvkError(-9999), protocol=protocol))
    assert type(plain) is DvkError and plain.code == -9999


def test_threshold_invariant():
    # task endpoints never collide with DVS codes (the _NR_TASKS < 300 invariant)
    assert all(c < E.EDVSERRCODE for n, c in CODES.items()
               if c <= -300 and n != "EDVSERRCODE")
