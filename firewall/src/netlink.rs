//! The NETLINK_NETFILTER socket: batch encoding and acknowledgement reading.
//!
//! Owns: one long-lived `NETLINK_NETFILTER` socket, sequence numbers, the
//! encoding of nftables set-element batches (`NFNL_MSG_BATCH_BEGIN` ..
//! `NFNL_MSG_BATCH_END`), set-element dumps, and the reading of every
//! ack/error the kernel sends back.
//! Must not touch: the ruleset (that is `nft -f`, in `ruleset.rs`), key
//! encodings (the caller passes raw key/data bytes), conntrack semantics
//! (`conntrack.rs` only borrows [`NfSocket::request`]).
//!
//! The socket talks to the network namespace of the thread that created it.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    nftables::{
        DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
        SetElementMessage,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::elements::ElemBytes;
use crate::error::FirewallError;

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_NEWSETELEM`.
const NFT_MSG_NEWSETELEM: u16 = 12;
/// `NFT_MSG_DESTROYSETELEM` (kernel >= 6.3): like DELSETELEM, but a missing
/// element is not an error. netlink-packet-netfilter 0.4 has no variant for
/// it, so a DELSETELEM is encoded and its type byte rewritten.
const NFT_MSG_DESTROYSETELEM: u8 = 30;
const RECV_BUF: usize = 64 * 1024;

/// What to do with one set element (or a whole set).
#[derive(Debug, Clone)]
pub(crate) enum ElemOp {
    /// NEWSETELEM without NLM_F_EXCL: creates the element, or (kernel >= 6.10)
    /// refreshes the timeout of an identical existing element.
    Add {
        key: ElemBytes,
        data: Option<ElemBytes>,
        timeout_ms: u64,
    },
    /// DESTROYSETELEM: deletes the element if present.
    Destroy { key: ElemBytes },
    /// DELSETELEM without an element list: removes every element of the set.
    Flush,
}

impl ElemOp {
    fn name(&self) -> &'static str {
        match self {
            ElemOp::Add { .. } => "add element",
            ElemOp::Destroy { .. } => "delete element",
            ElemOp::Flush => "flush set",
        }
    }
}

/// One element as dumped by the kernel.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawElem {
    pub key: Vec<u8>,
    pub data: Option<Vec<u8>>,
    pub timeout_ms: Option<u64>,
    pub expiration_ms: Option<u64>,
}

/// The long-lived NETLINK_NETFILTER socket.
#[derive(Debug)]
pub(crate) struct NfSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// The last batch sent, reused: encoding a batch allocates nothing once it has grown
    /// to the largest batch seen (issue 7: no allocation per knock).
    batch: EncodedBatch,
}

impl NfSocket {
    /// Opens the socket in the current thread's network namespace.
    pub(crate) fn open() -> Result<Self, FirewallError> {
        let what = "opening the NETLINK_NETFILTER socket";
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| FirewallError::io(what, e))?;
        sock.bind_auto().map_err(|e| FirewallError::io(what, e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| FirewallError::io(what, e))?;
        // Acks carry only the original header, not the whole request.
        sock.set_cap_ack(true)
            .map_err(|e| FirewallError::io(what, e))?;
        Ok(NfSocket {
            sock,
            seq: std::process::id().wrapping_mul(7919),
            buf: vec![0; RECV_BUF],
            batch: EncodedBatch::default(),
        })
    }

    fn next_seq(&mut self) -> u32 {
        next_seq(&mut self.seq)
    }

    /// Sends one transaction (batch) of element operations on `table` and
    /// checks the ack of every operation. The kernel applies all or nothing.
    pub(crate) fn batch(
        &mut self,
        table: &str,
        ops: &[(&str, ElemOp)],
    ) -> Result<(), FirewallError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        encode_batch_into(table, ops, &mut self.seq, &mut batch);
        let result = self.send_batch(table, ops, &batch);
        self.batch = batch;
        result
    }

    /// Sends `batch` (the encoding of `ops`) and reads every ack.
    fn send_batch(
        &mut self,
        table: &str,
        ops: &[(&str, ElemOp)],
        batch: &EncodedBatch,
    ) -> Result<(), FirewallError> {
        let EncodedBatch {
            bytes: out,
            begin_seq,
            end_seq,
            pending,
        } = batch;
        let (begin_seq, end_seq) = (*begin_seq, *end_seq);
        self.send(out, "sending an nftables batch")?;

        // Every message flagged NLM_F_ACK gets exactly one answer (0 or -errno);
        // a batch refused as a whole is answered once, on the BATCH_BEGIN seq.
        let mut first_err: Option<(usize, i32)> = None;
        let mut remaining = pending.len();
        while remaining > 0 {
            let n = self.recv("reading nftables acks")?;
            for m in RawIter::new(&self.buf[..n]) {
                let m = m.map_err(|d| FirewallError::Protocol {
                    what: "reading nftables acks".into(),
                    detail: d,
                })?;
                if m.ty != NLMSG_ERROR {
                    continue;
                }
                let errno = m.errno().ok_or_else(|| FirewallError::Protocol {
                    what: "reading nftables acks".into(),
                    detail: "short NLMSG_ERROR".into(),
                })?;
                if m.seq == begin_seq || m.seq == end_seq {
                    if errno != 0 {
                        let (set, op) = &ops[0];
                        return Err(FirewallError::from_set_errno(op.name(), table, set, errno));
                    }
                    continue;
                }
                if let Some(&(_, idx)) = pending.iter().find(|(s, _)| *s == m.seq) {
                    remaining = remaining.saturating_sub(1);
                    if errno != 0 && first_err.is_none() {
                        first_err = Some((idx, errno));
                    }
                }
                // Answers with a foreign seq are stale leftovers: ignored.
            }
        }
        if let Some((idx, errno)) = first_err {
            let (set, op) = &ops[idx];
            return Err(FirewallError::from_set_errno(op.name(), table, set, errno));
        }
        Ok(())
    }

    /// Dumps every element of `table`/`set`.
    pub(crate) fn dump_set(
        &mut self,
        table: &str,
        set: &str,
    ) -> Result<Vec<RawElem>, FirewallError> {
        let seq = self.next_seq();
        let mut out = Vec::with_capacity(64);
        emit(
            &mut out,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
                NfTablesMessage::GetSetElement(SetElementMessage {
                    attributes: vec![
                        SetElementList::Table(table.to_owned()),
                        SetElementList::Set(set.to_owned()),
                    ],
                }),
            ),
        );
        let what = "listing set elements";
        self.send(&out, what)?;
        let mut elems = Vec::new();
        loop {
            let n = self.recv(what)?;
            for m in RawIter::new(&self.buf[..n]) {
                let m = m.map_err(|d| FirewallError::Protocol {
                    what: what.into(),
                    detail: d,
                })?;
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(elems),
                    NLMSG_ERROR => {
                        let errno = m.errno().unwrap_or(libc::EINVAL);
                        if errno == 0 {
                            return Ok(elems);
                        }
                        return Err(FirewallError::from_set_errno("list set", table, set, errno));
                    }
                    NLMSG_NOOP => {}
                    ty if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => {
                        parse_elems(m.payload, &mut elems).map_err(|detail| {
                            FirewallError::Protocol {
                                what: format!("decoding elements of set {set}"),
                                detail,
                            }
                        })?;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends one standalone (non-batch) request with NLM_F_ACK and returns
    /// the kernel's answer: 0 or a positive errno.
    pub(crate) fn request(
        &mut self,
        flags: u16,
        msg: NetfilterMessage,
        what: &str,
    ) -> Result<i32, FirewallError> {
        let seq = self.next_seq();
        let mut out = Vec::with_capacity(64);
        emit(&mut out, flags | NLM_F_REQUEST | NLM_F_ACK, seq, msg);
        self.send(&out, what)?;
        loop {
            let n = self.recv(what)?;
            for m in RawIter::new(&self.buf[..n]) {
                let m = m.map_err(|d| FirewallError::Protocol {
                    what: what.into(),
                    detail: d,
                })?;
                if m.seq == seq && m.ty == NLMSG_ERROR {
                    return m.errno().ok_or_else(|| FirewallError::Protocol {
                        what: what.into(),
                        detail: "short NLMSG_ERROR".into(),
                    });
                }
            }
        }
    }

    fn send(&self, buf: &[u8], what: &str) -> Result<(), FirewallError> {
        let n = self
            .sock
            .send(buf, 0)
            .map_err(|e| FirewallError::io(what, e))?;
        if n != buf.len() {
            return Err(FirewallError::Protocol {
                what: what.into(),
                detail: format!("short send: {n} of {} bytes", buf.len()),
            });
        }
        Ok(())
    }

    fn recv(&mut self, what: &str) -> Result<usize, FirewallError> {
        loop {
            match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FirewallError::io(what, e)),
            }
        }
    }
}

/// One element transaction encoded for the kernel: BATCH_BEGIN, one message per op,
/// BATCH_END, and the sequence numbers its acks will carry.
#[derive(Debug, Default)]
pub(crate) struct EncodedBatch {
    pub(crate) bytes: Vec<u8>,
    pub(crate) begin_seq: u32,
    pub(crate) end_seq: u32,
    /// (seq, index into `ops`) of every op, which each get one ack.
    pub(crate) pending: Vec<(u32, usize)>,
}

fn next_seq(seq: &mut u32) -> u32 {
    *seq = seq.wrapping_add(1);
    *seq
}

/// Encodes `ops` on `table` as one transaction, numbering messages after `*seq` (pure:
/// no socket; what [`NfSocket::batch`] sends).
pub(crate) fn encode_batch(table: &str, ops: &[(&str, ElemOp)], seq: &mut u32) -> EncodedBatch {
    let mut batch = EncodedBatch::default();
    encode_batch_into(table, ops, seq, &mut batch);
    batch
}

/// `nfgenmsg.nfgen_family` of the batch delimiters and of the set-element messages.
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

/// [`encode_batch`] into `out` (cleared first; its buffers are reused). Writes the
/// netlink messages in place, the same bytes netlink-packet-netfilter's typed messages
/// serialize to (a unit test compares them), without building those typed messages:
/// they own a `String` per name and a `Vec` per attribute.
pub(crate) fn encode_batch_into(
    table: &str,
    ops: &[(&str, ElemOp)],
    seq: &mut u32,
    out: &mut EncodedBatch,
) {
    out.bytes.clear();
    out.pending.clear();
    let b = &mut out.bytes;
    out.begin_seq = next_seq(seq);
    let begin = message_start(b, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, out.begin_seq);
    nfgen(b, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES);
    message_end(b, begin);
    for (i, (set, op)) in ops.iter().enumerate() {
        let seq = next_seq(seq);
        out.pending.push((seq, i));
        let (ty, flags) = match op {
            ElemOp::Add { .. } => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
            ElemOp::Destroy { .. } => {
                (u16::from(NFT_MSG_DESTROYSETELEM), NLM_F_REQUEST | NLM_F_ACK)
            }
            ElemOp::Flush => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let msg = message_start(b, (NFNL_SUBSYS_NFTABLES << 8) | ty, flags, seq);
        nfgen(b, NFPROTO_INET, 0);
        attr_str(b, NFTA_SET_ELEM_LIST_TABLE, table);
        attr_str(b, NFTA_SET_ELEM_LIST_SET, set);
        let (key, data, timeout_ms) = match op {
            ElemOp::Add {
                key,
                data,
                timeout_ms,
            } => (Some(key), data.as_ref(), Some(*timeout_ms)),
            ElemOp::Destroy { key } => (Some(key), None, None),
            ElemOp::Flush => (None, None, None),
        };
        if let Some(key) = key {
            let elements = nest_start(b, NFTA_SET_ELEM_LIST_ELEMENTS);
            let element = nest_start(b, NFTA_LIST_ELEM);
            let k = nest_start(b, NFTA_SET_ELEM_KEY);
            attr(b, NFTA_DATA_VALUE, key);
            nest_end(b, k);
            if let Some(data) = data {
                let d = nest_start(b, NFTA_SET_ELEM_DATA);
                attr(b, NFTA_DATA_VALUE, data);
                nest_end(b, d);
            }
            // Expiration = timeout: on kernels >= 6.10 this is what makes a
            // NEWSETELEM on an existing element restart its countdown
            // (without it only a *changed* timeout is applied).
            if let Some(ms) = timeout_ms {
                attr(b, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                attr(b, NFTA_SET_ELEM_EXPIRATION, &ms.to_be_bytes());
            }
            nest_end(b, element);
            nest_end(b, elements);
        }
        message_end(b, msg);
    }
    out.end_seq = next_seq(seq);
    let end = message_start(b, NFNL_MSG_BATCH_END, NLM_F_REQUEST, out.end_seq);
    nfgen(b, NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES);
    message_end(b, end);
}

/// Writes a netlink header with a length to be filled in; returns where it starts.
fn message_start(b: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> usize {
    let start = b.len();
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    start
}

/// Sets the length of the message at `start` (every attribute is already padded, so the
/// message ends 4-byte aligned).
fn message_end(b: &mut [u8], start: usize) {
    let len = u32::try_from(b.len() - start).unwrap_or(u32::MAX);
    b[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// `struct nfgenmsg`: family, version 0, resource id (big-endian).
fn nfgen(b: &mut Vec<u8>, family: u8, res_id: u16) {
    b.extend_from_slice(&[family, 0]);
    b.extend_from_slice(&res_id.to_be_bytes());
}

fn pad(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(4) {
        b.push(0);
    }
}

/// One attribute: length (header + payload, unpadded), type, payload, padding.
fn attr(b: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(payload);
    pad(b);
}

/// A NUL-terminated string attribute.
fn attr_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    let len = u16::try_from(4 + s.len() + 1).unwrap_or(u16::MAX);
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    pad(b);
}

fn nest_start(b: &mut Vec<u8>, ty: u16) -> usize {
    let start = b.len();
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

fn nest_end(b: &mut [u8], start: usize) {
    let len = u16::try_from(b.len() - start).unwrap_or(u16::MAX);
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Serializes one netlink message and appends it to `out`.
fn emit(out: &mut Vec<u8>, flags: u16, seq: u32, msg: NetfilterMessage) {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let start = out.len();
    out.resize(start + packet.buffer_len(), 0);
    packet.serialize(&mut out[start..]);
    // Netlink messages in one datagram are 4-byte aligned.
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A raw netlink message inside a received datagram.
struct RawMsg<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

impl RawMsg<'_> {
    /// For NLMSG_ERROR: 0 (ack) or the positive errno.
    fn errno(&self) -> Option<i32> {
        let b: [u8; 4] = self.payload.get(..4)?.try_into().ok()?;
        Some(i32::from_ne_bytes(b).checked_neg().unwrap_or(i32::MAX))
    }
}

struct RawIter<'a> {
    buf: &'a [u8],
}

impl<'a> RawIter<'a> {
    fn new(buf: &'a [u8]) -> Self {
        RawIter { buf }
    }
}

impl<'a> Iterator for RawIter<'a> {
    type Item = Result<RawMsg<'a>, String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDR_LEN {
            return None;
        }
        let word = |i: usize| -> u32 {
            let mut b = [0u8; 4];
            b.copy_from_slice(&self.buf[i..i + 4]);
            u32::from_ne_bytes(b)
        };
        let len = word(0) as usize;
        let ty_flags = word(4);
        let seq = word(8);
        if len < NLMSG_HDR_LEN || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(format!("bad netlink message length {len}")));
        }
        let ty = u16::from_ne_bytes([ty_flags.to_ne_bytes()[0], ty_flags.to_ne_bytes()[1]]);
        let payload = &self.buf[NLMSG_HDR_LEN..len];
        let aligned = (len + 3) & !3;
        self.buf = self.buf.get(aligned..).unwrap_or(&[]);
        Some(Ok(RawMsg { ty, seq, payload }))
    }
}

/// Decodes the elements of one NEWSETELEM dump message.
fn parse_elems(payload: &[u8], out: &mut Vec<RawElem>) -> Result<(), String> {
    use netlink_packet_core::ParseableParametrized;
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
    let msg = NetfilterMessage::parse_with_param(payload, ty).map_err(|e| e.to_string())?;
    let NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(m)) = msg.inner else {
        return Err("not a set element message".into());
    };
    for attr in m.attributes {
        let SetElementList::Elements(list) = attr else {
            continue;
        };
        for item in list {
            let ListAttribute::Element(attrs) = item else {
                continue;
            };
            let mut e = RawElem::default();
            for a in attrs {
                match a {
                    SetElementAttribute::Key(DataAttribute::Value(v)) => e.key = v,
                    SetElementAttribute::Data(DataAttribute::Value(v)) => e.data = Some(v),
                    SetElementAttribute::Timeout(t) => e.timeout_ms = Some(t),
                    SetElementAttribute::Expiration(x) => e.expiration_ms = Some(x),
                    _ => {}
                }
            }
            out.push(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_open_batch, AppProto, Pinhole, SessionId};
    use netlink_packet_netfilter::none::ControlMessage;
    use std::time::Duration;

    /// (type, seq) of every message in an encoded batch.
    fn messages(bytes: &[u8]) -> Vec<(u16, u32)> {
        RawIter::new(bytes)
            .map(|m| m.map(|m| (m.ty, m.seq)).expect("a well-formed message"))
            .collect()
    }

    /// The former encoder, through netlink-packet-netfilter's typed messages: the
    /// reference the in-place encoder must match byte for byte.
    fn encode_batch_typed(table: &str, ops: &[(&str, ElemOp)], seq: &mut u32) -> EncodedBatch {
        let mut out = Vec::with_capacity(64 + ops.len() * 128);
        let begin_seq = next_seq(seq);
        emit(
            &mut out,
            NLM_F_REQUEST,
            begin_seq,
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                ControlMessage::BatchBegin,
            ),
        );
        let mut pending: Vec<(u32, usize)> = Vec::with_capacity(ops.len());
        for (i, (set, op)) in ops.iter().enumerate() {
            let seq = next_seq(seq);
            pending.push((seq, i));
            let mut attrs = vec![
                SetElementList::Table(table.to_owned()),
                SetElementList::Set((*set).to_owned()),
            ];
            let (msg, flags, destroy) = match op {
                ElemOp::Add {
                    key,
                    data,
                    timeout_ms,
                } => {
                    let mut e = vec![SetElementAttribute::Key(DataAttribute::Value(key.to_vec()))];
                    if let Some(d) = data {
                        e.push(SetElementAttribute::Data(DataAttribute::Value(d.to_vec())));
                    }
                    // Expiration = timeout: on kernels >= 6.10 this is what makes a
                    // NEWSETELEM on an existing element restart its countdown
                    // (without it only a *changed* timeout is applied).
                    e.push(SetElementAttribute::Timeout(*timeout_ms));
                    e.push(SetElementAttribute::Expiration(*timeout_ms));
                    attrs.push(SetElementList::Elements(vec![ListAttribute::Element(e)]));
                    (
                        NfTablesMessage::NewSetElement(SetElementMessage { attributes: attrs }),
                        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                        false,
                    )
                }
                ElemOp::Destroy { key } => {
                    let e = vec![SetElementAttribute::Key(DataAttribute::Value(key.to_vec()))];
                    attrs.push(SetElementList::Elements(vec![ListAttribute::Element(e)]));
                    (
                        NfTablesMessage::DeleteSetElement(SetElementMessage { attributes: attrs }),
                        NLM_F_REQUEST | NLM_F_ACK,
                        true,
                    )
                }
                ElemOp::Flush => (
                    NfTablesMessage::DeleteSetElement(SetElementMessage { attributes: attrs }),
                    NLM_F_REQUEST | NLM_F_ACK,
                    false,
                ),
            };
            let start = out.len();
            emit(
                &mut out,
                flags,
                seq,
                NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0), msg),
            );
            if destroy {
                // nlmsg_type is bytes 4..6 (host order): low byte = message, high = subsystem.
                let ty = (NFNL_SUBSYS_NFTABLES << 8) | u16::from(NFT_MSG_DESTROYSETELEM);
                out[start + 4..start + 6].copy_from_slice(&ty.to_ne_bytes());
            }
        }
        let end_seq = next_seq(seq);
        emit(
            &mut out,
            NLM_F_REQUEST,
            end_seq,
            NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                ControlMessage::BatchEnd,
            ),
        );
        EncodedBatch {
            bytes: out,
            begin_seq,
            end_seq,
            pending,
        }
    }

    const BEGIN: u16 = 0x10;
    const END: u16 = 0x11;
    const NEWSETELEM: u16 = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;

    #[test]
    fn the_in_place_encoder_writes_the_typed_messages_bytes() {
        let (map4, key4) =
            crate::elements::pinhole_key("10.0.0.2".parse().expect("literal"), AppProto::Tcp, 443);
        let (map6, key6) =
            crate::elements::pinhole_key("fd00::7".parse().expect("literal"), AppProto::Udp, 53);
        let mark = crate::elements::session_key(0x12_3456);
        let fwd = crate::elements::forward_data("[fd01::5]:8443".parse().expect("literal"));
        let ops: Vec<(&str, ElemOp)> = vec![
            (
                "sessions",
                ElemOp::Add {
                    key: mark,
                    data: None,
                    timeout_ms: 43_200_000,
                },
            ),
            (map4, ElemOp::Destroy { key: key4 }),
            (
                map4,
                ElemOp::Add {
                    key: key4,
                    data: Some(mark),
                    timeout_ms: 30_000,
                },
            ),
            (
                "forwards6",
                ElemOp::Add {
                    key: key6,
                    data: Some(fwd),
                    timeout_ms: 1,
                },
            ),
            (map6, ElemOp::Destroy { key: key6 }),
            ("pinholes6", ElemOp::Flush),
        ];
        for table in ["postern", "t", "abc", "a-longer-table-name"] {
            for n in 0..=ops.len() {
                let (mut seq_a, mut seq_b) = (41, 41);
                let typed = encode_batch_typed(table, &ops[..n], &mut seq_a);
                let mut reused = EncodedBatch::default();
                // Twice into one buffer: the second encoding must not keep the first.
                encode_batch_into(table, &ops, &mut seq_b.clone(), &mut reused);
                encode_batch_into(table, &ops[..n], &mut seq_b, &mut reused);
                assert_eq!(reused.bytes, typed.bytes, "table {table}, {n} ops");
                assert_eq!(reused.pending, typed.pending);
                assert_eq!(
                    (reused.begin_seq, reused.end_seq, seq_b),
                    (typed.begin_seq, typed.end_seq, seq_a)
                );
            }
        }
    }

    #[test]
    fn an_open_is_one_transaction_of_two_elements_or_three_with_a_forward() {
        let mut p = Pinhole {
            addr: "10.0.0.2".parse().expect("literal"),
            proto: AppProto::Tcp,
            port: 443,
            session: SessionId(7),
            forward: None,
        };
        let ttl = Duration::from_secs(30);
        let bytes = encode_open_batch("postern", &p, ttl, ttl).expect("valid pinhole");
        assert_eq!(bytes.len() % 4, 0, "netlink messages are 4-byte aligned");
        assert_eq!(
            messages(&bytes),
            vec![(BEGIN, 1), (NEWSETELEM, 2), (NEWSETELEM, 3), (END, 4)]
        );
        p.forward = Some("10.9.0.5:8443".parse().expect("literal"));
        let with_forward = encode_open_batch("postern", &p, ttl, ttl).expect("valid forward");
        assert_eq!(messages(&with_forward).len(), 5);
        p.session = SessionId(0);
        assert!(
            encode_open_batch("postern", &p, ttl, ttl).is_err(),
            "id 0 refused"
        );
    }
}
