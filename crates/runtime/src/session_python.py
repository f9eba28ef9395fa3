import ast, builtins, os, sys, traceback

def _dbx_main():
    status = os.fdopen(200, "w", buffering=1)
    cmd = 201
    sys.stdin = open(os.devnull)
    ns = {"__name__": "__main__", "__builtins__": builtins, "__doc__": None}

    def read_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(cmd, n - len(buf))
            if not chunk:
                os._exit(0)
            buf += chunk
        return buf

    def read_line():
        buf = b""
        while not buf.endswith(b"\n"):
            c = os.read(cmd, 1)
            if not c:
                os._exit(0)
            buf += c
        return buf

    status.write("ready 0\n")
    while True:
        try:
            nonce, size = read_line().decode().split()
            src = read_exact(int(size)).decode("utf-8", "replace")
        except KeyboardInterrupt:
            continue
        rc = 0
        try:
            try:
                tree = ast.parse(src, "<session>", "exec")
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = ast.Expression(tree.body.pop().value)
                exec(compile(tree, "<session>", "exec"), ns)
                if last is not None:
                    value = eval(compile(last, "<session>", "eval"), ns)
                    if value is not None:
                        builtins._ = value
                        print(repr(value))
            except SystemExit:
                raise
            except KeyboardInterrupt as e:
                traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
                rc = 130
            except BaseException as e:
                traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
                rc = 1
        except KeyboardInterrupt:
            rc = 130
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        status.write("%s %d\n" % (nonce, rc))

_dbx_main()
