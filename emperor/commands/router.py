"""router: the netrouter's connections, rules and drop counters."""


def execute(emperor, args, peer):
    return {"running": False, "connections": [], "rules": {"in": [], "out": []},
            "drops": {"firewall": 0, "spoofed": 0, "unknown_destination": 0, "ipv6": 0, "oversize": 0, "malformed": 0}}
