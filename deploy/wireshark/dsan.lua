-- Wireshark / tshark dissector for dsan's SAN frames (EtherType 0x88B5).
-- Byte layout: docs/wire-protocol.md. Install: copy to ~/.local/lib/wireshark/plugins/
-- or run `tshark -X lua_script:dsan.lua ...`. Another EtherType: change DSAN_ETHERTYPE.
local DSAN_ETHERTYPE = 0x88B5

local dsan = Proto("dsan", "dsan SAN protocol")

local kinds = {
  [0x01] = "ConnectRequest", [0x02] = "Accept", [0x03] = "Reject", [0x04] = "Close",
  [0x05] = "CloseAck", [0x06] = "AcceptAck", [0x10] = "ResolveRequest", [0x11] = "ResolveReply",
  [0x20] = "EchoRequest", [0x21] = "EchoReply",
}
local reasons = {
  [0x01] = "backlog_full", [0x02] = "no_listener", [0x03] = "refused",
  [0x04] = "no_resources", [0x05] = "listener_closed",
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

local body_len = { [0x01] = 16, [0x02] = 24, [0x03] = 24, [0x04] = 16, [0x05] = 16, [0x06] = 16,
                   [0x10] = 0, [0x11] = 8, [0x20] = 16, [0x21] = 16 }

function dsan.dissector(buf, pinfo, tree)
  if buf:len() < 18 then return 0 end
  pinfo.cols.protocol = "DSAN"
  local kind = buf(1, 1):uint()
  local t = tree:add(dsan, buf(0, math.min(buf:len(), 18 + (body_len[kind] or 0))))
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
  elseif kind == 0x02 then
    t:add(f.conn_id, buf(b, 8)); t:add(f.client_token, buf(b + 8, 8)); t:add(f.server_token, buf(b + 16, 8))
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
