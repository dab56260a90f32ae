//! Conntrack cleanup by mark over ctnetlink.
//!
//! Owns: the `IPCTNL_MSG_CT_DELETE` request without a tuple and with a
//! `CTA_MARK` + `CTA_MARK_MASK` filter, which makes the kernel flush exactly
//! the entries whose mark equals the session's tagged mark (all address families).
//! Must not touch: nftables objects, entries with any other mark.

use netlink_packet_core::DefaultNla;
use netlink_packet_netfilter::{
    conntrack::{ConntrackAttribute, ConntrackMessage},
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
};

use crate::{error::FirewallError, netlink::NfSocket};

/// `CTA_MARK_MASK` (include/uapi/linux/netfilter/nfnetlink_conntrack.h).
const CTA_MARK_MASK: u16 = 21;

/// Deletes every conntrack entry of session `id` (mark = the tagged mark, compared on
/// all 32 bits, so no foreign mark is touched). Having none is fine.
pub(crate) fn delete_by_mark(sock: &mut NfSocket, id: u32) -> Result<(), FirewallError> {
    let mark = crate::elements::ct_mark(id);
    let msg = NetfilterMessage::new(
        // AF_UNSPEC: the kernel's flush filter then matches IPv4 and IPv6.
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
        ConntrackMessage::Delete(vec![
            ConntrackAttribute::CtaMark(mark),
            ConntrackAttribute::Other(DefaultNla::new(
                CTA_MARK_MASK,
                u32::MAX.to_be_bytes().to_vec(),
            )),
        ]),
    );
    let errno = sock.request(0, msg, "deleting conntrack entries by mark")?;
    match errno {
        0 | libc::ENOENT => Ok(()),
        libc::EPERM | libc::EACCES => Err(FirewallError::PermissionDenied {
            what: format!("deleting conntrack entries with mark {mark}"),
        }),
        errno => Err(FirewallError::Conntrack { mark, errno }),
    }
}
