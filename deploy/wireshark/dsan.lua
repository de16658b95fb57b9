-- Wireshark / tshark dissector for dsan's SAN frames (EtherType 0x88B5).
-- Byte layout: docs/wire-protocol.md. Install: copy to ~/.local/lib/wireshark/plugins/
-- or run `tshark -X lua_script:dsan.lua ...`. Another EtherType: change DSAN_ETHERTYPE.
local DSAN_ETHERTYPE = 0x88B5

local dsan = Proto("dsan", "dsan SAN protocol")

local kinds = {
  [0x01] = "ConnectRequest", [0x02] = "Accept", [0x03] = "Reject", [0x04] = "Close",
  [0x05] = "CloseAck", [0x06] = "AcceptAck", [0x07] = "Data", [0x08] = "Ack", [0x09] = "Reset",
  [0x10] = "ResolveRequest", [0x11] = "ResolveReply",
  [0x20] = "EchoRequest", [0x21] = "EchoReply",
}
local reasons = {
  [0x01] = "backlog_full", [0x02] = "no_listener", [0x03] = "refused",
  [0x04] = "no_resources", [0x05] = "listener_closed", [0x06] = "tcp_only",
}

local reset_reasons = {
  [0x01] = "process_gone", [0x02] = "aborted", [0x03] = "no_connection",
  [0x04] = "timed_out", [0x05] = "shutdown", [0x06] = "protocol",
}

local f = dsan.fields
f.version = ProtoField.uint8("dsan.version", "Version", base.DEC)
f.kind = ProtoField.uint8("dsan.kind", "Kind", base.HEX, kinds)
f.flags = ProtoField.uint16("dsan.flags", "Flags", base.HEX)
f.src_port = ProtoField.uint16("dsan.src_port", "Source port", base.DEC)
f.src_ip = ProtoField.ipv4("dsan.src_ip", "Source SAN address")
f.dst_ip = ProtoField.ipv4("dsan.dst_ip", "Destination SAN address")
f.dst_port = ProtoField.uint16("dsan.dst_port", "Destination port", base.DEC)
f.body_len = ProtoField.uint16("dsan.body_len", "Body length", base.DEC)
f.conn_id = ProtoField.uint64("dsan.conn_id", "Connection id", base.HEX)
f.client_token = ProtoField.uint64("dsan.client_token", "Client token", base.HEX)
f.server_token = ProtoField.uint64("dsan.server_token", "Server token", base.HEX)
f.token = ProtoField.uint64("dsan.token", "Receiver's token", base.HEX)
f.reason = ProtoField.uint8("dsan.reason", "Reject reason", base.HEX, reasons)
f.mac = ProtoField.ether("dsan.mac", "Resolved MAC")
f.seq = ProtoField.uint64("dsan.seq", "Echo sequence", base.DEC)
f.stamp = ProtoField.uint64("dsan.stamp", "Echo stamp", base.DEC)
f.window = ProtoField.uint32("dsan.window", "Offered receive window", base.DEC)
f.mss = ProtoField.uint16("dsan.mss", "Offered max payload", base.DEC)
f.sseq = ProtoField.uint64("dsan.stream_seq", "Stream offset", base.DEC)
f.ack = ProtoField.uint64("dsan.ack", "Acknowledged up to", base.DEC)
f.limit = ProtoField.uint64("dsan.limit", "Credit limit", base.DEC)
f.seg_flags = ProtoField.uint8("dsan.seg_flags", "Segment flags (1 FIN, 2 NAK, 4 PROBE, 8 URG)", base.HEX)
f.payload_len = ProtoField.uint16("dsan.payload_len", "Payload length", base.DEC)
f.payload = ProtoField.bytes("dsan.payload", "Payload")
f.reset_reason = ProtoField.uint8("dsan.reset_reason", "Reset reason", base.HEX, reset_reasons)

local body_len = { [0x01] = 24, [0x02] = 32, [0x03] = 24, [0x04] = 16, [0x05] = 16, [0x06] = 16,
                   [0x07] = 44, [0x08] = 44, [0x09] = 24,
                   [0x10] = 0, [0x11] = 8, [0x20] = 16, [0x21] = 16 }

function dsan.dissector(buf, pinfo, tree)
  if buf:len() < 18 then return 0 end
  pinfo.cols.protocol = "DSAN"
  local kind = buf(1, 1):uint()
  local declared = buf(16, 2):uint()
  local t = tree:add(dsan, buf(0, math.min(buf:len(), 18 + math.max(declared, body_len[kind] or 0))))
  t:add(f.version, buf(0, 1))
  t:add(f.kind, buf(1, 1))
  t:add(f.flags, buf(2, 2))
  t:add(f.src_port, buf(4, 2))
  t:add(f.src_ip, buf(6, 4))
  t:add(f.dst_ip, buf(10, 4))
  t:add(f.dst_port, buf(14, 2))
  t:add(f.body_len, buf(16, 2))
  local name = kinds[kind] or string.format("Unknown(0x%02x)", kind)
  local info = string.format("%s %s:%d -> %s:%d", name, tostring(buf(6, 4):ipv4()), buf(4, 2):uint(),
                             tostring(buf(10, 4):ipv4()), buf(14, 2):uint())
  local need = body_len[kind]
  if need == nil or buf:len() < 18 + need then
    t:add_expert_info(PI_MALFORMED, PI_ERROR, "unknown kind or truncated body")
    pinfo.cols.info = info .. " [malformed]"
    return buf:len()
  end
  local b = 18
  if kind == 0x01 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.client_token, buf(b + 8, 8))
    t:add(f.window, buf(b + 16, 4)); t:add(f.mss, buf(b + 20, 2))
  elseif kind == 0x02 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.client_token, buf(b + 8, 8)); t:add(f.server_token, buf(b + 16, 8))
    t:add(f.window, buf(b + 24, 4)); t:add(f.mss, buf(b + 28, 2))
  elseif kind == 0x07 or kind == 0x08 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.token, buf(b + 8, 8)); t:add(f.sseq, buf(b + 16, 8))
    t:add(f.ack, buf(b + 24, 8)); t:add(f.limit, buf(b + 32, 8)); t:add(f.seg_flags, buf(b + 40, 1))
    t:add(f.payload_len, buf(b + 42, 2))
    local n = buf(b + 42, 2):uint()
    if n > 0 and buf:len() >= 18 + need + n then
      t:add(f.payload, buf(b + need, n))
    end
    info = info .. string.format(" seq=%s len=%d ack=%s", tostring(buf(b + 16, 8):uint64()), n,
                                 tostring(buf(b + 24, 8):uint64()))
    need = need + n
  elseif kind == 0x09 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.token, buf(b + 8, 8)); t:add(f.reset_reason, buf(b + 16, 1))
    info = info .. " reason=" .. (reset_reasons[buf(b + 16, 1):uint()] or "unknown")
  elseif kind == 0x03 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.client_token, buf(b + 8, 8)); t:add(f.reason, buf(b + 16, 1))
    info = info .. " reason=" .. (reasons[buf(b + 16, 1):uint()] or "unknown")
  elseif kind == 0x04 or kind == 0x05 or kind == 0x06 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.token, buf(b + 8, 8))
  elseif kind == 0x11 then
    t:add(f.mac, buf(b, 6))
  elseif kind == 0x20 or kind == 0x21 then
    t:add(f.seq, buf(b, 8)); t:add(f.stamp, buf(b + 8, 8))
  end
  pinfo.cols.info = info
  return 18 + need
end

DissectorTable.get("ethertype"):add(DSAN_ETHERTYPE, dsan)
