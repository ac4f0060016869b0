#!/usr/bin/env python3
"""Generate the bad-input corpus of test-data/bad/ (see README.md there).

Reproducible: fixed UIDs, no randomness, so running it again rewrites the
same bytes. The tests read the committed outputs and never run this script.
Needs python3 and pydicom (only to take MR_small.dcm apart).

Kinds of input (field "kind" of corpus.json):
  raw           the file is the exact byte stream a peer writes after
                connecting (PDUs, including the A-ASSOCIATE-RQ built by
                assoc_rq() below and then corrupted)
  dimse-command the file is a command set (Implicit VR LE); the test sends it
                on an accepted presentation context of a normal association,
                followed by the data set named in "dataset" (if any)
  dimse-store   the file is a data set; the test sends a C-STORE-RQ naming
                "sop_class"/"sop_instance" and then the file on the
                presentation context of transfer syntax "ts"

"expect" lists what the node answers, in order, until it closes the
connection: "ac" (A-ASSOCIATE-AC, every context accepted) or "ac(ID=REASON,..)"
(contexts refused, PS3.8 Table 9-18 reason), "rj(RESULT,SOURCE,REASON)"
(A-ASSOCIATE-RJ, the numbers of PS3.8 Table 9-21), "abort(SOURCE,REASON)"
(A-ABORT), "rp" (A-RELEASE-RP), "status=0xNNNN" (a DIMSE response).
"""
import json
import os
import struct
import sys
import warnings

import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
MR_FILE = os.path.join(HERE, "..", "dicom", "MR_small.dcm")

APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"

# The UID root of every instance in the corpus (2.25 + a fixed number).
ROOT = "2.25.3141592653589793238462643383279"

entries = []


def uid(n):
    return f"{ROOT}.{n}"


# ---------------------------------------------------------------- PDU level

def item(item_type, payload):
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type, payload, length=None):
    if length is None:
        length = len(payload)
    return struct.pack(">BBI", pdu_type, 0, length) + payload


def ae(title):
    raw = title if isinstance(title, bytes) else title.encode("ascii")
    return raw.ljust(16, b" ")[:16]


def pc_item(pc_id, abstract, transfer_syntaxes, item_type=0x20):
    body = struct.pack(">BBBB", pc_id, 0, 0, 0)
    if abstract is not None:
        body += item(0x30, abstract.encode())
    for ts in transfer_syntaxes:
        body += item(0x40, ts.encode())
    return item(item_type, body)


def user_info(max_len=16384, extra=b""):
    body = item(0x51, struct.pack(">I", max_len))
    body += item(0x52, b"1.2.826.0.1.3680043.9.7777.1")
    body += item(0x55, b"BADGEN")
    return item(0x50, body + extra)


def standard_contexts():
    return (
        pc_item(1, MR, [EXPLICIT])
        + pc_item(3, MR, [JPEG_BASELINE])
        + pc_item(5, MR, [IMPLICIT])
        + pc_item(7, VERIFICATION, [IMPLICIT])
    )


def assoc_rq_body(called="HER2MAP", calling="BADSCU", version=1,
                  app_context=APP_CONTEXT, contexts=None, user=None):
    body = struct.pack(">HH", version, 0) + ae(called) + ae(calling) + bytes(32)
    if app_context is not None:
        body += item(0x10, app_context.encode())
    body += standard_contexts() if contexts is None else contexts
    body += user_info() if user is None else user
    return body


def assoc_rq(**kw):
    return pdu(0x01, assoc_rq_body(**kw))


RQ = assoc_rq()
RELEASE_RQ = pdu(0x05, bytes(4))
RELEASE_RP = pdu(0x06, bytes(4))
ABORT = pdu(0x07, bytes([0, 0, 0, 0]))


def pdv(pc_id, command, last, data):
    header = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">IBB", len(data) + 2, pc_id, header) + data


def pdata(*pdvs):
    return pdu(0x04, b"".join(pdvs))


# --------------------------------------------------------- DIMSE level

def element(group, elem, value):
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHI", group, elem, len(value)) + value


def us(v):
    return struct.pack("<H", v)


def command(field=None, message_id=1, sop_class=MR, sop_instance=None,
            data_set=True, extra=b"", group_length=True):
    """A command set in Implicit VR Little Endian, elements in tag order."""
    els = b""
    if sop_class is not None:
        els += element(0x0000, 0x0002, sop_class.encode())
    if field is not None:
        els += element(0x0000, 0x0100, us(field))
    if message_id is not None:
        els += element(0x0000, 0x0110, us(message_id))
    if field == 0x0001:
        els += element(0x0000, 0x0700, us(0))  # priority
    if data_set is not None:
        els += element(0x0000, 0x0800, us(0x0000 if data_set else 0x0101))
    if sop_instance is not None:
        els += element(0x0000, 0x1000, sop_instance.encode())
    els += extra
    if group_length:
        els = element(0x0000, 0x0000, struct.pack("<I", len(els))) + els
    return els


def store_command(sop_instance, sop_class=MR, message_id=1):
    return command(0x0001, message_id, sop_class, sop_instance, True)


def mr_dataset(sop_instance, implicit=False, **changes):
    ds = pydicom.dcmread(MR_FILE)
    ds.SOPInstanceUID = sop_instance
    for k, v in changes.items():
        setattr(ds, k, v)
    return dataset_bytes(ds, implicit)


def dataset_bytes(ds, implicit=False):
    fp = pydicom.filebase.DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


# ------------------------------------------------------------ the corpus

def add(name, kind, what, expect, data, **extra):
    if kind.startswith("dimse-"):
        # The test wraps these in a normal association that ends in a release.
        expect = ["ac"] + expect + ([] if expect[-1].startswith("abort") else ["rp"])
    path = os.path.join(HERE, name)
    with open(path, "wb") as f:
        f.write(data)
    entry = {"file": name, "kind": kind, "what": what, "expect": expect}
    entry.update(extra)
    entries.append(entry)


def raw(name, what, expect, data, **extra):
    add(name, "raw", what, expect, data, **extra)


def main():
    # pydicom warns about the hostile UIDs on purpose.
    warnings.simplefilter("ignore")
    # Reference: a well-formed association that echoes and releases.
    echo = command(0x0030, 7, VERIFICATION, None, False)

    # --- PDUs before association
    raw("raw_unknown_pdu_type.bin", "first PDU of unknown type 0x09",
        ["abort(2,1)"], pdu(0x09, bytes(4)))
    raw("raw_pdata_before_rq.bin", "P-DATA-TF instead of A-ASSOCIATE-RQ",
        ["abort(2,2)"], pdata(pdv(1, True, True, echo)))
    raw("raw_ac_instead_of_rq.bin",
        "an A-ASSOCIATE-AC (holding the RQ's items, so it does not parse) sent to the acceptor",
        ["abort(2,6)"], pdu(0x02, assoc_rq_body()))
    raw("raw_rq_length_long_hold.bin",
        "A-ASSOCIATE-RQ whose length claims 100 bytes more than sent; peer then waits",
        [], pdu(0x01, assoc_rq_body(), len(assoc_rq_body()) + 100), hold_open=True)
    raw("raw_rq_length_long_eof.bin",
        "A-ASSOCIATE-RQ whose length claims 100 bytes more than sent; peer closes",
        [], pdu(0x01, assoc_rq_body(), len(assoc_rq_body()) + 100), eof=True)
    raw("raw_rq_length_short.bin",
        "A-ASSOCIATE-RQ whose length is 10 bytes short (cuts the user information item)",
        ["abort(2,6)"], pdu(0x01, assoc_rq_body(), len(assoc_rq_body()) - 10))
    raw("raw_rq_length_absurd.bin", "A-ASSOCIATE-RQ claiming a length of 0xFFFFFFF0",
        ["abort(2,6)"], pdu(0x01, assoc_rq_body(), 0xFFFFFFF0))
    raw("raw_rq_length_zero.bin", "A-ASSOCIATE-RQ of length 0",
        ["abort(2,6)"], pdu(0x01, b""))
    raw("raw_rq_truncated_eof.bin", "half an A-ASSOCIATE-RQ, then the peer closes",
        [], RQ[: len(RQ) // 2], eof=True)
    raw("raw_rq_item_length_lies.bin",
        "presentation context item whose length runs past the end of the PDU",
        ["abort(2,6)"],
        pdu(0x01, assoc_rq_body(contexts=b"\x20\x00\xff\x00" + pc_item(1, MR, [EXPLICIT])[4:],
                                user=b"")))
    raw("raw_rq_unknown_item.bin", "A-ASSOCIATE-RQ holding an item of unknown type 0x99",
        ["abort(2,6)"], pdu(0x01, assoc_rq_body() + item(0x99, b"1234")))
    raw("raw_rq_unknown_subitem.bin",
        "presentation context with a sub-item of unknown type 0x77",
        ["abort(2,6)"],
        assoc_rq(contexts=item(0x20, struct.pack(">BBBB", 1, 0, 0, 0)
                               + item(0x30, MR.encode()) + item(0x77, b"xx"))))
    raw("raw_rq_no_app_context.bin", "A-ASSOCIATE-RQ without application context item",
        ["abort(2,6)"], assoc_rq(app_context=None))
    raw("raw_rq_wrong_app_context.bin", "application context name 1.2.3.4",
        ["rj(1,1,2)"], assoc_rq(app_context="1.2.3.4"))
    raw("raw_rq_protocol_version_0.bin", "protocol version 0 (bit 0 not set)",
        ["rj(1,1,1)"], assoc_rq(version=0))
    raw("raw_rq_called_ae_wrong.bin", "called AE title NOT-ME",
        ["rj(1,1,7)"], assoc_rq(called="NOT-ME"))
    raw("raw_rq_called_ae_blank.bin", "called AE title of 16 spaces",
        ["rj(1,1,7)"], assoc_rq(called="                "))
    raw("raw_rq_called_ae_non_ascii.bin", "called AE title HËR2MAP (UTF-8 bytes)",
        ["rj(1,1,7)"], assoc_rq(called="HËR2MAP".encode("utf-8")))
    raw("raw_rq_calling_ae_non_ascii.bin",
        "calling AE title ÆRØSCU (UTF-8 bytes), C-ECHO, release",
        ["ac", "status=0x0000", "rp"],
        assoc_rq(calling="ÆRØSCU".encode("utf-8")) + pdata(pdv(7, True, True, echo)) + RELEASE_RQ)
    raw("raw_rq_pc_no_transfer_syntax.bin",
        "the only presentation context proposes no transfer syntax; then release",
        ["ac(1=4)", "rp"], assoc_rq(contexts=pc_item(1, MR, [])) + RELEASE_RQ)
    raw("raw_rq_pc_no_abstract_syntax.bin",
        "presentation context without abstract syntax sub-item",
        ["abort(2,6)"], assoc_rq(contexts=pc_item(1, None, [EXPLICIT])))
    raw("raw_rq_pc_unknown_abstract_syntax.bin",
        "presentation context for abstract syntax 1.2.3.999; then release",
        ["ac(1=3)", "rp"], assoc_rq(contexts=pc_item(1, "1.2.3.999", [EXPLICIT])) + RELEASE_RQ)
    raw("raw_rq_pc_unknown_transfer_syntax.bin",
        "presentation context for MR with transfer syntax 1.2.3.4.5 only; then release",
        ["ac(1=4)", "rp"], assoc_rq(contexts=pc_item(1, MR, ["1.2.3.4.5"])) + RELEASE_RQ)
    raw("raw_rq_max_pdu_zero.bin",
        "maximum length 0 (unlimited), C-ECHO, release",
        ["ac", "status=0x0000", "rp"],
        assoc_rq(user=user_info(max_len=0)) + pdata(pdv(7, True, True, echo)) + RELEASE_RQ)
    many = b"".join(pc_item((2 * i + 1) % 256, MR, [EXPLICIT]) for i in range(1500))
    raw("raw_rq_larger_than_max_pdu.bin",
        "A-ASSOCIATE-RQ of ~100 KB (1500 presentation contexts), above the node's maximum",
        ["abort(2,6)"], assoc_rq(contexts=many))
    # PS3.8's state table says A-ABORT here; dicom-ul answers A-RELEASE-RP
    # and closes, which ends the connection just as well.
    raw("raw_release_before_rq.bin", "A-RELEASE-RQ instead of A-ASSOCIATE-RQ",
        ["rp"], RELEASE_RQ)

    # --- after the association is accepted
    raw("raw_garbage_after_rq.bin", "A-ASSOCIATE-RQ followed by 64 bytes 0xDE",
        ["ac", "abort(2,6)"], RQ + b"\xde" * 64)
    raw("raw_unknown_pdu_after_rq.bin", "PDU of unknown type 0x0A after the association",
        ["ac", "abort(2,2)"], RQ + pdu(0x0A, bytes(4)))
    raw("raw_second_rq.bin", "a second A-ASSOCIATE-RQ on an open association",
        ["ac", "abort(2,2)"], RQ + RQ)
    raw("raw_release_rp_unsolicited.bin", "A-RELEASE-RP nobody asked for",
        ["ac", "abort(2,2)"], RQ + RELEASE_RP)
    raw("raw_abort_after_rq.bin", "the peer aborts right after the association",
        ["ac"], RQ + ABORT)
    raw("raw_pdata_larger_than_max.bin",
        "P-DATA-TF of 70000 bytes, above the negotiated maximum of 65536",
        ["ac", "abort(2,6)"],
        RQ + pdata(pdv(1, True, False, bytes(69994))))
    raw("raw_pdata_length_absurd.bin", "P-DATA-TF claiming a length of 0xFFFFFFFF",
        ["ac", "abort(2,6)"], RQ + pdu(0x04, b"\0" * 16, 0xFFFFFFFF))
    raw("raw_pdv_length_long.bin", "PDV item claiming 1000 bytes in a 20-byte P-DATA-TF",
        ["ac", "abort(2,6)"],
        RQ + pdu(0x04, struct.pack(">IBB", 1000, 1, 3) + bytes(14)))
    raw("raw_pdv_length_one.bin", "PDV item of length 1 (no room for its header)",
        ["ac", "abort(2,6)"], RQ + pdu(0x04, struct.pack(">IB", 1, 1) + bytes(1)))
    raw("raw_pdata_empty.bin", "P-DATA-TF holding no PDV, then C-ECHO and release",
        ["ac", "status=0x0000", "rp"],
        RQ + pdu(0x04, b"") + pdata(pdv(7, True, True, echo)) + RELEASE_RQ)
    store = store_command(uid(1))
    mr = mr_dataset(uid(1))
    truncated = pdu(0x04, pdv(1, False, True, mr[:5000])[:1000], 5006)
    raw("raw_pdata_truncated_eof.bin",
        "C-STORE whose data P-DATA-TF is cut after 1000 of 5006 bytes; the peer closes",
        ["ac"], RQ + pdata(pdv(1, True, True, store)) + truncated, eof=True)
    raw("raw_pdata_truncated_hold.bin",
        "C-STORE whose data P-DATA-TF is cut after 1000 of 5006 bytes; the peer waits",
        ["ac", "abort(2,6)"], RQ + pdata(pdv(1, True, True, store)) + truncated,
        hold_open=True)
    raw("raw_release_mid_data_set.bin",
        "A-RELEASE-RQ after the first fragment of a C-STORE data set",
        ["ac", "rp"],
        RQ + pdata(pdv(1, True, True, store)) + pdata(pdv(1, False, False, mr[:4000]))
        + RELEASE_RQ)
    raw("raw_release_mid_command.bin",
        "A-RELEASE-RQ after the first fragment of a command set",
        ["ac", "rp"], RQ + pdata(pdv(1, True, False, store[:20])) + RELEASE_RQ)
    raw("raw_abort_mid_data_set.bin",
        "A-ABORT after the first fragment of a C-STORE data set",
        ["ac"],
        RQ + pdata(pdv(1, True, True, store)) + pdata(pdv(1, False, False, mr[:4000])) + ABORT)
    raw("raw_data_without_command.bin", "a data set fragment before any command",
        ["ac", "abort(2,2)"], RQ + pdata(pdv(1, False, True, mr[:200])))
    raw("raw_command_on_unproposed_pc.bin", "C-ECHO on presentation context 9 (never proposed)",
        ["ac", "abort(2,2)"], RQ + pdata(pdv(9, True, True, echo)))
    raw("raw_command_on_refused_pc.bin",
        "C-ECHO on a presentation context the node refused",
        ["ac(1=3)", "abort(2,2)"],
        assoc_rq(contexts=pc_item(1, "1.2.3.999", [IMPLICIT])) + pdata(pdv(1, True, True, echo)))
    raw("raw_data_on_other_pc.bin",
        "C-STORE command on context 1, its data set on context 5",
        ["ac", "abort(2,2)"],
        RQ + pdata(pdv(1, True, True, store)) + pdata(pdv(5, False, True, mr)))
    raw("raw_command_interleaved.bin",
        "a new command while a data set is in flight",
        ["ac", "abort(2,2)"],
        RQ + pdata(pdv(1, True, True, store)) + pdata(pdv(1, False, False, mr[:100]))
        + pdata(pdv(7, True, True, echo)))
    big = bytes(16000)
    raw("raw_command_set_too_large.bin",
        "command set fragments adding up to 80 KB",
        ["ac", "abort(2,2)"], RQ + b"".join(pdata(pdv(1, True, False, big)) for _ in range(5)))

    # --- DIMSE commands (sent on an accepted context of a normal association)
    def cmd(name, what, expect, data, dataset=None, pc=1):
        add(name, "dimse-command", what, expect, data, dataset=dataset, pc=pc)

    add("ds_query.bin", "data", "C-FIND identifier used by the command cases", None,
        dataset_bytes(query_dataset()))
    entries.pop()
    cmd("cmd_missing_message_id.bin", "C-ECHO-RQ without Message ID",
        ["abort(2,2)"], command(0x0030, None, VERIFICATION, None, False), pc=7)
    cmd("cmd_missing_command_field.bin", "command set without Command Field",
        ["abort(2,2)"], command(None, 1, VERIFICATION, None, False), pc=7)
    cmd("cmd_missing_data_set_type.bin", "C-ECHO-RQ without Command Data Set Type",
        ["abort(2,2)"], command(0x0030, 1, VERIFICATION, None, None), pc=7)
    cmd("cmd_store_missing_instance_uid.bin",
        "C-STORE-RQ without Affected SOP Instance UID, with a data set",
        ["status=0x0212"], command(0x0001, 1, MR, None, True), dataset="ds_query.bin")
    cmd("cmd_store_missing_class_uid.bin",
        "C-STORE-RQ without Affected SOP Class UID, with a data set",
        ["status=0x0212"], command(0x0001, 1, None, uid(2), True), dataset="ds_query.bin")
    cmd("cmd_store_wrong_class.bin",
        "C-STORE-RQ naming CT Image Storage on the MR context",
        ["status=0x0122"], store_command(uid(3), sop_class=CT), dataset="ds_query.bin")
    cmd("cmd_store_without_data_set.bin",
        "C-STORE-RQ whose Command Data Set Type says no data set",
        ["status=0x0211"], command(0x0001, 1, MR, uid(4), False))
    cmd("cmd_c_find.bin", "C-FIND-RQ with an identifier (storage-only node)",
        ["status=0x0211"], command(0x0020, 1, FIND, None, True), dataset="ds_query.bin")
    cmd("cmd_c_move.bin", "C-MOVE-RQ with an identifier",
        ["status=0x0211"],
        command(0x0021, 1, FIND, None, True, extra=element(0x0000, 0x0600, b"ELSEWHERE")),
        dataset="ds_query.bin")
    cmd("cmd_c_get.bin", "C-GET-RQ with an identifier",
        ["status=0x0211"], command(0x0010, 1, FIND, None, True), dataset="ds_query.bin")
    cmd("cmd_n_action.bin", "N-ACTION-RQ without data set",
        ["status=0x0211"], command(0x0130, 1, VERIFICATION, None, False), pc=7)
    cmd("cmd_echo_with_data_set.bin", "C-ECHO-RQ announcing a data set",
        ["status=0x0211"], command(0x0030, 1, VERIFICATION, None, True),
        dataset="ds_query.bin", pc=7)
    cmd("cmd_echo_rsp_as_request.bin", "a C-ECHO-RSP sent to the SCP",
        ["status=0x0211"], command(0x8030, 1, VERIFICATION, None, False), pc=7)
    cmd("cmd_garbage.bin", "64 bytes 0xFF as a command set",
        ["abort(2,2)"], b"\xff" * 64, pc=7)
    cmd("cmd_empty.bin", "an empty command set (one empty last fragment)",
        ["abort(2,2)"], b"", pc=7)
    cmd("cmd_element_length_absurd.bin",
        "command element claiming a length of 0xFFFFFFF0",
        ["abort(2,2)"],
        command(0x0030, 1, VERIFICATION, None, False)
        + struct.pack("<HHI", 0x0000, 0x4000, 0xFFFFFFF0) + b"xx", pc=7)
    nested = b""
    for _ in range(3000):
        nested = struct.pack("<HHI", 0x0000, 0x5000, 0xFFFFFFFF) + struct.pack(
            "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + nested
    cmd("cmd_nested_undefined_length.bin",
        "C-ECHO-RQ with 3000 nested undefined-length items in an unknown element",
        ["abort(2,2)"], command(0x0030, 1, VERIFICATION, None, False) + nested, pc=7)
    seq = b""
    for _ in range(2000):
        inner = struct.pack("<HHI", 0xFFFE, 0xE000, len(seq)) + seq
        seq = struct.pack("<HHI", 0x0008, 0x1115, len(inner)) + inner
    cmd("cmd_nested_sequences.bin",
        "C-ECHO-RQ carrying 2000 nested Referenced Series Sequences (group 0008)",
        ["abort(2,2)"], command(0x0030, 1, VERIFICATION, None, False) + seq, pc=7)

    # --- data sets of a C-STORE
    def ds(name, what, expect, data, sop_instance, sop_class=MR, ts=EXPLICIT, stored=False):
        add(name, "dimse-store", what, expect, data, sop_class=sop_class,
            sop_instance=sop_instance, ts=ts, stored=stored)

    ds("ds_instance_uid_differs.bin", "data set SOP Instance UID differs from the command",
       ["status=0xA900"], mr_dataset(uid(10)), uid(11))
    ds("ds_class_uid_differs.bin", "data set SOP Class UID (CT) differs from the command (MR)",
       ["status=0xA900"], mr_dataset(uid(12), SOPClassUID=CT), uid(12))
    ds("ds_garbage.bin", "1000 bytes 0xFF", ["status=0xC000"], b"\xff" * 1000, uid(13))
    ds("ds_empty.bin", "an empty data set", ["status=0xC000"], b"", uid(14))
    ds("ds_truncated.bin", "MR data set cut inside its header elements",
       ["status=0xC000"], mr_dataset(uid(15))[:700], uid(15))
    ds("ds_no_sop_uids.bin", "a data set with Patient ID only",
       ["status=0xC000"], dataset_bytes(patient_only()), uid(16))
    ds("ds_element_length_absurd.bin",
       "MR data set with an element (0009,0010) claiming 0xFFFFFFF0 bytes before Pixel Data",
       ["status=0xC000"], enormous_length(uid(17)), uid(17))
    ds("ds_implicit_on_explicit.bin",
       "Implicit VR data set sent on an Explicit VR Little Endian context",
       ["status=0xC000"], mr_dataset(uid(18), implicit=True), uid(18))
    ds("ds_nested_sequences_deep.bin",
       "10000 nested undefined-length sequences before the SOP UIDs",
       ["status=0xC000"], deep_sequences(uid(19), 10000, defined=False), uid(19))
    ds("ds_nested_sequences_deep_defined.bin",
       "3000 nested defined-length sequences before the SOP UIDs",
       ["status=0xC000"], deep_sequences(uid(20), 3000, defined=True), uid(20))
    ds("ds_nested_sequences_20.bin", "20 nested sequences (a deep but real SR tree)",
       ["status=0x0000"], deep_sequences(uid(21), 20, defined=False), uid(21), stored=True)
    ds("ds_pixel_data_garbage.bin",
       "MR whose Pixel Data is 100 bytes of noise (does not decode)",
       ["status=0x0000"], mr_dataset(uid(22), PixelData=bytes(range(100))), uid(22), stored=True)
    ds("ds_pixel_data_jpeg_garbage.bin",
       "JPEG Baseline context: encapsulated Pixel Data whose fragment is not JPEG",
       ["status=0x0000"], encapsulated_garbage(uid(23)), uid(23), ts=JPEG_BASELINE,
       stored=True)
    ds("ds_uid_path_traversal.bin",
       "SOP Instance UID ../../../../tmp/evil in command and data set (refused before receiving)",
       ["status=0xC000"], mr_dataset("../../../../tmp/evil"), "../../../../tmp/evil")
    ds("ds_uid_separators.bin", "SOP Instance UID 1.2/3.4 in command and data set",
       ["status=0xC000"], mr_dataset("1.2/3.4"), "1.2/3.4")
    ds("ds_study_series_uid_hostile.bin",
       "Study UID ../../../../tmp, Series UID a/b<NUL>c (stored under sanitised names)",
       ["status=0x0000"],
       mr_dataset(uid(29), StudyInstanceUID="../../../../tmp", SeriesInstanceUID="a/b\0c"),
       uid(29), stored=True)
    ds("ds_study_uid_backslash.bin", "Study UID ..\\..\\x (three values), Series UID empty",
       ["status=0x0000"],
       mr_dataset(uid(30), StudyInstanceUID="..\\..\\x", SeriesInstanceUID=""),
       uid(30), stored=True)
    long_uid = "1." + "2" * 300
    ds("ds_uid_overlong.bin", "SOP Instance UID of 302 characters",
       ["status=0x0000"], mr_dataset(long_uid), long_uid, stored=True)
    ds("ds_pn_utf8_declared.bin", "Patient's Name Müller^Jürgen with Specific Character Set ISO_IR 192",
       ["status=0x0000"],
       charset_dataset(uid(24), "ISO_IR 192", "Müller^Jürgen".encode("utf-8")), uid(24),
       stored=True)
    ds("ds_pn_latin1_undeclared.bin", "Patient's Name with Latin-1 bytes and no character set",
       ["status=0x0000"], charset_dataset(uid(25), None, "Müller^Jürgen".encode("latin-1")),
       uid(25), stored=True)
    ds("ds_charset_unknown.bin", "Specific Character Set ISO_IR 999 (unknown)",
       ["status=0x0000"], charset_dataset(uid(26), "ISO_IR 999", b"Smith^Jo"), uid(26),
       stored=True)
    ds("ds_pn_invalid_utf8.bin", "ISO_IR 192 declared, Patient's Name is not valid UTF-8",
       ["status=0x0000"], charset_dataset(uid(27), "ISO_IR 192", b"\xff\xfe\xc3(^\x80"),
       uid(27), stored=True)
    ds("ds_pn_cjk.bin", "Patient's Name in Japanese (ISO 2022 IR 87 declared)",
       ["status=0x0000"],
       charset_dataset(uid(28), "\\ISO 2022 IR 87",
                       "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B".encode("latin-1")),
       uid(28), stored=True)

    entries.sort(key=lambda e: e["file"])
    with open(os.path.join(HERE, "corpus.json"), "w") as f:
        json.dump(entries, f, indent=1, ensure_ascii=False)
        f.write("\n")
    write_readme()
    print(f"{len(entries)} inputs written", file=sys.stderr)


README_HEAD = """# Bad-input corpus

Hand-made hostile inputs for the Storage SCP, with the answer the node gives
to each. `tests/bad_input.rs` sends every one to the real node (in-process,
port 0, read timeout 2 s), compares the answer, checks that no temporary
file and no unexpected row is left, that the association's end is recorded
in the audit log, that stored paths are sanitised UIDs, and finally that
C-ECHO and a C-STORE of `test-data/dicom/MR_small.dcm` still succeed.

Everything here is generated by `make_corpus.py` (python3 + pydicom; the
tests never run it): edit the script, run `python3 make_corpus.py` in this
folder, commit the outputs. `corpus.json` is the manifest the test reads.

Kinds: **raw** = the file is the exact byte stream written after connecting
(PDUs, starting from an A-ASSOCIATE-RQ built by `assoc_rq()` and then
corrupted); **dimse-command** = a command set (Implicit VR LE) sent on an
accepted context of a normal association, followed by the data set named in
the manifest; **dimse-store** = a data set sent after a C-STORE-RQ naming the
manifest's SOP Class/Instance UID, on the context of its transfer syntax.
Both DIMSE kinds end with A-RELEASE-RQ.

Answers, in order, until the node closes the connection: `ac` (A-ASSOCIATE-AC,
all contexts accepted) or `ac(ID=R)` (context ID refused with PS3.8 reason R:
3 abstract syntax, 4 transfer syntaxes not supported); `rj(result,source,reason)`
(A-ASSOCIATE-RJ: `rj(1,1,7)` called AE title not recognised, `rj(1,1,2)`
application context not supported, `rj(1,1,1)` no reason given);
`abort(source,reason)` (A-ABORT from the service provider: reason 1
unrecognised PDU, 2 unexpected PDU, 6 invalid PDU parameter); `rp`
(A-RELEASE-RP); `status=0xNNNN` (DIMSE response). An empty answer means the
node closed the connection without a PDU (the peer closed first, or the
A-ASSOCIATE-RQ never completed: PS3.8 closes silently on ARTIM expiry).

Every input also leaves a log line (`association rejected`, `association
closed` with its outcome, or `instance refused`) and an audit event.

Known deviations, from dicom-ul: an A-RELEASE-RQ instead of an A-ASSOCIATE-RQ
is answered A-RELEASE-RP (PS3.8 says A-ABORT; the connection ends either
way), and protocol version 0 is rejected with `rj(1,1,1)` rather than
`rj(1,2,2)`.

| input | kind | what it is | the node answers |
|---|---|---|---|
"""


def write_readme():
    rows = []
    for e in entries:
        what = e["what"].replace("|", "\\|")
        answer = ", ".join(f"`{a}`" for a in e["expect"]) or "closes, no PDU"
        if e.get("stored"):
            answer += " (stored)"
        rows.append(f"| `{e['file']}` | {e['kind']} | {what} | {answer} |")
    with open(os.path.join(HERE, "README.md"), "w") as f:
        f.write(README_HEAD)
        f.write("\n".join(rows) + "\n")
        f.write(f"\n{len(entries)} inputs.\n")


def query_dataset():
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "*"
    q.StudyInstanceUID = ""
    return q


def patient_only():
    d = Dataset()
    d.PatientID = "NOUIDS"
    return d


def explicit_element(group, elem, vr, value):
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def minimal(sop_instance, extra_before=b"", charset=None, name=b"Anon^Patient"):
    """A small MR data set in Explicit VR LE, elements in tag order."""
    out = b""
    if charset is not None:
        out += explicit_element(0x0008, 0x0005, b"CS", charset.encode())
    out += explicit_element(0x0008, 0x0016, b"UI", MR.encode())
    out += explicit_element(0x0008, 0x0018, b"UI", sop_instance.encode())
    out += explicit_element(0x0008, 0x0060, b"CS", b"MR")
    out += extra_before
    out += explicit_element(0x0010, 0x0010, b"PN", name)
    out += explicit_element(0x0010, 0x0020, b"LO", b"BAD-1")
    out += explicit_element(0x0020, 0x000D, b"UI", uid(90).encode())
    out += explicit_element(0x0020, 0x000E, b"UI", uid(91).encode())
    return out


def charset_dataset(sop_instance, charset, name):
    return minimal(sop_instance, charset=charset, name=name)


def enormous_length(sop_instance):
    return minimal(sop_instance) + struct.pack("<HH", 0x0029, 0x1010) + b"OB\0\0" + struct.pack(
        "<I", 0xFFFFFFF0) + b"\0" * 64


def deep_sequences(sop_instance, depth, defined):
    """`depth` nested Referenced Series Sequences (0008,1115), each holding
    one item with the next, placed in tag order after Modality."""
    seq = b""
    for _ in range(depth):
        if defined:
            it = struct.pack("<HHI", 0xFFFE, 0xE000, len(seq)) + seq
            seq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack("<I", len(it)) + it
        else:
            it = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + seq + struct.pack(
                "<HHI", 0xFFFE, 0xE00D, 0)
            seq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack(
                "<I", 0xFFFFFFFF) + it + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return minimal(sop_instance, extra_before=seq)


def encapsulated_garbage(sop_instance):
    body = minimal(sop_instance)
    frag = b"not a jpeg stream at all"
    pixel = (struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" + struct.pack("<I", 0xFFFFFFFF)
             + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
             + struct.pack("<HHI", 0xFFFE, 0xE000, len(frag)) + frag
             + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return body + pixel


if __name__ == "__main__":
    main()
