-- What the default sandbox leaves out, seen from a handler.
function probe()
  local out = {}
  local function kind(v) return type(v) end
  out.io = kind(io)
  out.os_execute = kind(os.execute)
  out.os_exit = kind(os.exit)
  out.os_getenv = kind(os.getenv)
  out.os_remove = kind(os.remove)
  out.os_time = kind(os.time)
  out.dofile = kind(dofile)
  out.loadfile = kind(loadfile)
  out.package = kind(package)
  out.debug = kind(debug)
  out.string_dump = kind(string.dump)
  out.require_file = (pcall(require, "some_module_on_disk")) and "loaded" or "refused"
  out.require_queue = require("queue") == queue and "same" or "other"
  local chunk, err = load("\27Lua\84\0", "bytes", "b")
  out.binary_chunk = chunk == nil and "refused" or "loaded"
  out.text_chunk = load("return 6 * 7")()
  out.collect_stop = (pcall(collectgarbage, "stop")) and "stopped" or "refused"
  assert(queue.publish("app:emails", out))
end

function with_os()
  local out = {
    getenv = type(os.getenv("PATH")),
    exit = (pcall(os.exit, 3)) and "exited" or "refused",
    require_os_getenv = type(require("os").getenv),
  }
  assert(queue.publish("app:emails", out))
end

-- `allow: [require]` is for Lua files: the standard library's own modules come as
-- the sandbox gives them, never the real ones that `package.loaded` holds.
function with_require()
  local out = {}
  for _, name in ipairs({"_G", "package", "debug", "io"}) do
    out[name] = (pcall(require, name)) and "loaded" or "refused"
  end
  out.os_exit = type(require("os").exit)
  out.string = require("string") == string and "same" or "other"
  assert(queue.publish("app:emails", out))
end
