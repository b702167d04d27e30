//! A sink host for egress tests: the far end of a [`Link`](crate::Link)
//! that nothing but the guest can reach. It answers nothing (the test
//! image's `05-sovereign-test-sink.network` gives the guest's third NIC
//! static neighbour entries for [`SINK_V4`] and [`SINK_V6`] at
//! [`SINK_MAC`]) and counts, by protocol, every IP packet that reaches it
//! addressed to it, so a test can show that a node sends nothing out and
//! that the same attempts do arrive once the firewall is gone.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{LinkEnd, VmError};

/// The sink's IPv4 address on its link.
pub const SINK_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The sink's IPv6 address on its link.
pub const SINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
/// The MAC address the guest's static neighbour entries give the sink.
pub const SINK_MAC: &str = "02:00:00:00:99:01";

/// Packets that reached the sink addressed to it, by protocol.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkCounts {
    /// TCP to any port but 53, over IPv4 or IPv6.
    pub tcp: u64,
    /// UDP to any port but 53.
    pub udp: u64,
    /// DNS: TCP or UDP to port 53.
    pub dns: u64,
    /// ICMP (IPv4).
    pub icmp: u64,
    /// ICMPv6.
    pub icmpv6: u64,
    /// Any other IP protocol.
    pub other: u64,
}

impl SinkCounts {
    /// Every packet counted.
    pub fn total(&self) -> u64 {
        self.tcp + self.udp + self.dns + self.icmp + self.icmpv6 + self.other
    }
}

/// A running sink; stops when dropped.
pub struct Sink {
    counts: Arc<Mutex<SinkCounts>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on `end` (the other end goes to the guest's NIC).
    pub fn start(end: LinkEnd) -> Result<Self, VmError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| VmError::Io { what, source }
        };
        let socket = UnixDatagram::bind(&end.local).map_err(io("binding the sink's socket"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(io("setting the sink's read timeout"))?;
        let counts = Arc::new(Mutex::new(SinkCounts::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            std::thread::spawn(move || {
                let _end = end;
                let mut frame = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = socket.recv(&mut frame) else {
                        continue;
                    };
                    if let Some(protocol) = classify(&frame[..n]) {
                        let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
                        *protocol.counter(&mut counts) += 1;
                    }
                }
            })
        };
        Ok(Self {
            counts,
            stop,
            reader: Some(reader),
        })
    }

    /// What has reached the sink so far.
    pub fn counts(&self) -> SinkCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The protocol of a packet addressed to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
    Dns,
    Icmp,
    Icmpv6,
    Other,
}

impl Protocol {
    fn counter(self, counts: &mut SinkCounts) -> &mut u64 {
        match self {
            Protocol::Tcp => &mut counts.tcp,
            Protocol::Udp => &mut counts.udp,
            Protocol::Dns => &mut counts.dns,
            Protocol::Icmp => &mut counts.icmp,
            Protocol::Icmpv6 => &mut counts.icmpv6,
            Protocol::Other => &mut counts.other,
        }
    }
}

/// The protocol of an Ethernet frame carrying an IP packet to the sink's
/// address; `None` for anything else (ARP, neighbour discovery and router
/// solicitations to multicast groups, packets for other hosts).
fn classify(frame: &[u8]) -> Option<Protocol> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (protocol, payload) = match ethertype {
        0x0800 => {
            let header = usize::from(ip.first()? & 0x0f) * 4;
            let destination: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            if Ipv4Addr::from(destination) != SINK_V4 {
                return None;
            }
            (*ip.get(9)?, ip.get(header..)?)
        }
        0x86dd => {
            let destination: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            if Ipv6Addr::from(destination) != SINK_V6 {
                return None;
            }
            (*ip.get(6)?, ip.get(40..)?)
        }
        _ => return None,
    };
    let port = || payload.get(2..4).map(|p| u16::from_be_bytes([p[0], p[1]]));
    Some(match protocol {
        6 | 17 if port() == Some(53) => Protocol::Dns,
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        1 => Protocol::Icmp,
        58 => Protocol::Icmpv6,
        _ => Protocol::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(protocol: u8, destination: Ipv4Addr, port: u16) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20 + 8];
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame[14] = 0x45;
        frame[14 + 9] = protocol;
        frame[14 + 16..14 + 20].copy_from_slice(&destination.octets());
        frame[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&port.to_be_bytes());
        frame
    }

    fn ipv6(next: u8, destination: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 40 + 8];
        frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        frame[14] = 0x60;
        frame[14 + 6] = next;
        frame[14 + 24..14 + 40].copy_from_slice(&destination.octets());
        frame[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&port.to_be_bytes());
        frame
    }

    #[test]
    fn packets_to_the_sink_are_told_apart_by_protocol_and_others_ignored() {
        assert_eq!(classify(&ipv4(6, SINK_V4, 80)), Some(Protocol::Tcp));
        assert_eq!(classify(&ipv4(17, SINK_V4, 9)), Some(Protocol::Udp));
        assert_eq!(classify(&ipv4(17, SINK_V4, 53)), Some(Protocol::Dns));
        assert_eq!(classify(&ipv4(6, SINK_V4, 53)), Some(Protocol::Dns));
        assert_eq!(classify(&ipv4(1, SINK_V4, 0)), Some(Protocol::Icmp));
        assert_eq!(classify(&ipv6(58, SINK_V6, 0)), Some(Protocol::Icmpv6));
        assert_eq!(classify(&ipv6(6, SINK_V6, 443)), Some(Protocol::Tcp));
        assert_eq!(classify(&ipv6(47, SINK_V6, 0)), Some(Protocol::Other));
        // Neighbour discovery to a multicast group, another host, ARP, runts.
        let solicited: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        assert_eq!(classify(&ipv6(58, solicited, 0)), None);
        assert_eq!(classify(&ipv4(6, Ipv4Addr::new(10, 99, 0, 2), 80)), None);
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(classify(&arp), None);
        assert_eq!(classify(&[0u8; 13]), None);
        assert_eq!(classify(&ipv4(6, SINK_V4, 80)[..30]), None);
    }

    #[test]
    fn the_test_image_gives_the_sink_nic_the_sinks_neighbour_entries() {
        let network = include_str!("../agent/05-sovereign-test-sink.network");
        for expected in [
            format!("Address={SINK_V4}\nLinkLayerAddress={SINK_MAC}"),
            format!("Address={SINK_V6}\nLinkLayerAddress={SINK_MAC}"),
        ] {
            assert!(network.contains(&expected), "{expected}");
        }
    }

    #[test]
    fn a_sink_counts_the_frames_sent_to_its_socket() {
        let link = crate::Link::new().unwrap();
        let (guest, host) = link.ends();
        let sink = Sink::start(host).unwrap();
        let nic = UnixDatagram::unbound().unwrap();
        for frame in [
            ipv4(1, SINK_V4, 0),
            ipv6(58, SINK_V6, 0),
            ipv4(17, SINK_V4, 53),
        ] {
            nic.send_to(&frame, &guest.remote).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.counts().total() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let counts = sink.counts();
        assert_eq!(
            (counts.icmp, counts.icmpv6, counts.dns),
            (1, 1, 1),
            "{counts:?}"
        );
    }
}
