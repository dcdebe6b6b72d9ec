-- wrk script: distinct hostnames, 3 agents each, Go wire format, no Content-Type.
-- wrk -t2 -c64 -d10s -s meta-node/benches/heartbeat.lua http://127.0.0.1:2000/heartbeat
local counter = 0
local prefix = ""
function setup(thread)
  thread:set("prefix", "t" .. tostring(math.random(100000, 999999)) .. "-")
end
function init(args)
  prefix = prefix ~= "" and prefix or "t0-"
end
function request()
  counter = counter + 1
  local host = prefix .. "host-" .. tostring(counter % 1000000)
  local body = '{"hostname":"' .. host .. '","ip":"10.1.2.3","runUser":"root","updaterVersion":"0.1.0","realAgents":[' ..
    '{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1700000000,"runUser":"falcon","workDir":"/home/falcon/open-falcon"},' ..
    '{"name":"mysql-monitor","version":"0.0.5","status":"started","timestamp":1700000000,"runUser":"falcon","workDir":"/home/falcon/open-falcon"},' ..
    '{"name":"naming-agent","version":"1.2.0","status":"started","timestamp":1700000000,"runUser":"root","workDir":"/opt/ops"}]}'
  return wrk.format("POST", nil, nil, body)
end
