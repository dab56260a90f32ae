//! Captured IP packets (sniff mode's header walk, `postern_gateway::capture::ip`): every
//! IPv4/IPv6/UDP header field wrong, truncations at each header boundary, fragments,
//! extension headers, other protocols, ports and link types. Each must be dropped
//! silently (`None`): a dark gateway does not answer or log garbage.

use postern_gateway::capture::ip::{spa_datagram, ETH_P_IP, ETH_P_IPV6};

const PORT: u16 = 62201;

pub struct Case {
    pub name: String,
    pub packet: Vec<u8>,
    pub ethertype: u16,
}

fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = 40000u16.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn v4(dport: u16, payload: &[u8]) -> Vec<u8> {
    let u = udp(dport, payload);
    let mut p = vec![
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 10, 198, 51, 100, 1,
    ];
    p[2..4].copy_from_slice(&(20 + u.len() as u16).to_be_bytes());
    p.extend_from_slice(&u);
    p
}

fn v6(dport: u16, payload: &[u8]) -> Vec<u8> {
    let u = udp(dport, payload);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(u.len() as u16).to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01]);
    p.extend_from_slice(&u);
    p
}

const PAYLOAD: &[u8] = &[0xa5; 204];

pub fn cases() -> Vec<Case> {
    let mut c = Vec::new();
    let mut add = |name: String, ethertype: u16, f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = if ethertype == ETH_P_IPV6 {
            v6(PORT, PAYLOAD)
        } else {
            v4(PORT, PAYLOAD)
        };
        f(&mut p);
        c.push(Case {
            name,
            packet: p,
            ethertype,
        });
    };
    // IPv4 header.
    for version in [0u8, 1, 5, 6, 15] {
        add(format!("v4: version {version}"), ETH_P_IP, &|p| {
            p[0] = (version << 4) | 5
        });
    }
    for ihl in 0u8..5 {
        add(format!("v4: IHL {ihl}"), ETH_P_IP, &|p| p[0] = 0x40 | ihl);
    }
    add("v4: IHL past the packet".into(), ETH_P_IP, &|p| {
        p[0] = 0x4f;
        p.truncate(40);
    });
    add(
        "v4: IHL 15 swallows the UDP header".into(),
        ETH_P_IP,
        &|p| {
            p[0] = 0x4f;
            p[2..4].copy_from_slice(&60u16.to_be_bytes());
        },
    );
    for total in [0u16, 19, 27] {
        add(format!("v4: total length {total}"), ETH_P_IP, &|p| {
            p[2..4].copy_from_slice(&total.to_be_bytes())
        });
    }
    add("v4: total length past the packet".into(), ETH_P_IP, &|p| {
        let t = p.len() as u16 + 1;
        p[2..4].copy_from_slice(&t.to_be_bytes());
    });
    add("v4: total length 65535".into(), ETH_P_IP, &|p| {
        p[2..4].copy_from_slice(&[0xff, 0xff])
    });
    add("v4: more fragments".into(), ETH_P_IP, &|p| p[6] = 0x20);
    add("v4: fragment offset 1".into(), ETH_P_IP, &|p| p[7] = 1);
    add("v4: fragment offset max".into(), ETH_P_IP, &|p| {
        p[6] = 0x1f;
        p[7] = 0xff;
    });
    add("v4: MF without DF".into(), ETH_P_IP, &|p| p[6] = 0x60);
    for proto in [0u8, 1, 6, 41, 58, 132, 255] {
        add(format!("v4: protocol {proto}"), ETH_P_IP, &|p| p[9] = proto);
    }
    // IPv6 header.
    for version in [0u8, 4, 5, 7, 15] {
        add(format!("v6: version {version}"), ETH_P_IPV6, &|p| {
            p[0] = version << 4
        });
    }
    for next in [0u8, 6, 43, 44, 50, 58, 59, 60] {
        add(format!("v6: next header {next}"), ETH_P_IPV6, &|p| {
            p[6] = next
        });
    }
    add(
        "v6: payload length past the packet".into(),
        ETH_P_IPV6,
        &|p| {
            let l = (p.len() - 40 + 1) as u16;
            p[4..6].copy_from_slice(&l.to_be_bytes());
        },
    );
    add("v6: payload length 65535".into(), ETH_P_IPV6, &|p| {
        p[4..6].copy_from_slice(&[0xff, 0xff])
    });
    for len in [0u16, 7] {
        add(format!("v6: payload length {len}"), ETH_P_IPV6, &|p| {
            p[4..6].copy_from_slice(&len.to_be_bytes())
        });
    }
    // UDP header, for both families.
    for (family, et, l4) in [("v4", ETH_P_IP, 20usize), ("v6", ETH_P_IPV6, 40)] {
        for port in [0u16, 53, PORT - 1, PORT + 1, 65535] {
            add(format!("{family}: destination port {port}"), et, &|p| {
                p[l4 + 2..l4 + 4].copy_from_slice(&port.to_be_bytes())
            });
        }
        for ulen in [0u16, 1, 7] {
            add(format!("{family}: UDP length {ulen}"), et, &|p| {
                p[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes())
            });
        }
        add(format!("{family}: UDP length past the packet"), et, &|p| {
            let u = (p.len() - l4 + 1) as u16;
            p[l4 + 4..l4 + 6].copy_from_slice(&u.to_be_bytes());
        });
        add(format!("{family}: UDP length 65535"), et, &|p| {
            p[l4 + 4..l4 + 6].copy_from_slice(&[0xff, 0xff])
        });
        for cut in [0usize, 1, 4, 8, l4 - 1, l4, l4 + 3, l4 + 5, l4 + 7] {
            add(format!("{family}: truncated to {cut} bytes"), et, &|p| {
                p.truncate(cut)
            });
        }
        // Link types that are not IP, and the families swapped.
        for other in [0u16, 0x0806, 0x8100, 0x88cc, 0xffff] {
            add(format!("{family}: ethertype {other:#06x}"), other, &|_| {});
        }
        let swapped = if et == ETH_P_IP { ETH_P_IPV6 } else { ETH_P_IP };
        add(
            format!("{family} packet under the other ethertype"),
            swapped,
            &|p| {
                *p = if et == ETH_P_IP {
                    v4(PORT, PAYLOAD)
                } else {
                    v6(PORT, PAYLOAD)
                };
            },
        );
    }
    c
}

#[test]
fn malformed_captured_packets_are_dropped_silently() {
    // The unmodified packets do carry the SPA payload.
    for (p, et) in [
        (v4(PORT, PAYLOAD), ETH_P_IP),
        (v6(PORT, PAYLOAD), ETH_P_IPV6),
    ] {
        let d = spa_datagram(&p, et, PORT).expect("reference packet parses");
        assert_eq!(&p[d.payload], PAYLOAD);
    }
    let cases = cases();
    let accepted: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            spa_datagram(&c.packet, c.ethertype, PORT).map(|d| format!("{}: {d:?}", c.name))
        })
        .collect();
    assert!(
        accepted.is_empty(),
        "{} of {} malformed packets yielded a datagram:\n{}",
        accepted.len(),
        cases.len(),
        accepted.join("\n")
    );
}
