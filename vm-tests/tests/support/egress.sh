#!/bin/sh
# Egress attempts from inside a node toward the test's sink host (10.99.0.1,
# fd99::1, on a link only the test reaches): TCP, UDP, DNS over UDP and TCP,
# ICMP and ICMPv6. Each attempt may fail; the sink counts what arrives.
try() { timeout 5 "$@" >/dev/null 2>&1; }
for host in 10.99.0.1 fd99::1; do
    try bash -c "echo sovereign > /dev/tcp/$host/80"
    try bash -c "echo sovereign > /dev/udp/$host/9"
    # A DNS query for example.test (A record), over UDP and over TCP.
    try bash -c "printf '\022\064\001\000\000\001\000\000\000\000\000\000\007example\004test\000\000\001\000\001' > /dev/udp/$host/53"
    try bash -c "echo > /dev/tcp/$host/53"
done
# ICMP echo requests through raw sockets (perl-base is in every Debian system).
try perl -MSocket=:all -e '
    socket(S, PF_INET, SOCK_RAW, 1) or die "socket: $!";
    my $p = pack("CCnnn", 8, 0, 0, 1, 1) . "sovereign-egress";
    my $s = 0; $s += $_ for unpack("n*", $p);
    $s = ($s >> 16) + ($s & 0xffff); $s += $s >> 16;
    substr($p, 2, 2) = pack("n", ~$s & 0xffff);
    send(S, $p, 0, pack_sockaddr_in(0, inet_aton("10.99.0.1"))) or die "send: $!";'
try perl -MSocket=:all -e '
    socket(S, AF_INET6, SOCK_RAW, 58) or die "socket: $!";
    my $p = pack("CCnnn", 128, 0, 0, 1, 1) . "sovereign-egress";
    send(S, $p, 0, pack_sockaddr_in6(0, inet_pton(AF_INET6, "fd99::1"))) or die "send: $!";'
echo "egress attempts made"
