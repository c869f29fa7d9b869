/* Isolation probes: prints one JSON object {"probe": "value", ...} and exits 0.
 *
 * Built static by the security suite (gcc -static -O1) so the same binary runs in a busybox or
 * Debian root, a microVM guest and a runc bundle. Every probe is harmless where it succeeds:
 * writable files are opened and closed, never written (except a marker under /proc/1/root/tmp
 * and a tmpfs mount that is undone); the module calls pass no module; the fork bomb is bounded
 * and killed; hostname changes stay in the sandbox's UTS namespace.
 *
 *   probe [--host-pid N] [--loopback-port P] [--host-addr A:P] [--private A:P] [--token T]
 *         [--blockdev MAJ:MIN] [--forks N]
 *   probe --alloc-mb M        allocate and touch M MiB, print {"alloc": "survived"}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int first = 1;

static void put(const char *key, const char *value) {
    printf("%s\n  \"%s\": \"", first ? "{" : ",", key);
    for (const char *p = value; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
    first = 0;
}

static const char *ename(int e);

/* The first of `paths` that exists, opened for writing (never written), or why not. */
static void open_write_any(const char *key, const char **paths) {
    char out[300];
    for (; *paths; paths++) {
        int fd = open(*paths, O_WRONLY);
        if (fd >= 0) {
            snprintf(out, sizeof out, "writable %s", *paths);
            put(key, out);
            close(fd);
            return;
        }
        if (errno != ENOENT) {
            snprintf(out, sizeof out, "%s %s", ename(errno), *paths);
            put(key, out);
            return;
        }
    }
    put(key, "absent");
}

static const char *ename(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EACCES: return "EACCES";
    case EROFS: return "EROFS";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case EFAULT: return "EFAULT";
    case ENOEXEC: return "ENOEXEC";
    case EBADF: return "EBADF";
    case ENXIO: return "ENXIO";
    case ENODEV: return "ENODEV";
    case EAGAIN: return "EAGAIN";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "errno %d", e);
        return buf;
    }
    }
}

static void status_field(const char *name, char *out, size_t n) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t len = strlen(name);
    snprintf(out, n, "unknown");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, name, len) && line[len] == ':') {
            char *v = line + len + 1;
            while (*v == ' ' || *v == '\t') v++;
            v[strcspn(v, "\n")] = 0;
            snprintf(out, n, "%s", v);
        }
    }
    fclose(f);
}

static void probe_status(void) {
    char v[128];
    status_field("CapEff", v, sizeof v); put("cap_eff", v);
    status_field("CapBnd", v, sizeof v); put("cap_bnd", v);
    status_field("Seccomp", v, sizeof v); put("seccomp", v);
    status_field("NoNewPrivs", v, sizeof v); put("no_new_privs", v);
}

static void probe_uid_map(void) {
    char line[256] = "unreadable", out[256];
    FILE *f = fopen("/proc/self/uid_map", "r");
    if (f) {
        if (!fgets(line, sizeof line, f)) snprintf(line, sizeof line, "empty");
        fclose(f);
    }
    unsigned long a, b, c;
    if (sscanf(line, "%lu %lu %lu", &a, &b, &c) == 3) snprintf(out, sizeof out, "%lu %lu %lu", a, b, c);
    else snprintf(out, sizeof out, "%s", line);
    put("uid_map", out);
}

/* The host's /dev/null, as the sandbox's /dev shows it: may the sandbox's root change its mode
 * (set to what it is, so nothing changes where it may)? */
static void probe_dev_chmod(void) {
    struct stat st;
    if (stat("/dev/null", &st) != 0) { put("dev_node_chmod", "absent"); return; }
    if (chmod("/dev/null", st.st_mode & 07777) == 0) put("dev_node_chmod", "allowed");
    else put("dev_node_chmod", ename(errno));
}

static const char *scratch_dir(void) {
    static const char *dirs[] = {"/tmp", "/var/tmp", "/root", "/"};
    for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++)
        if (access(dirs[i], W_OK) == 0) return dirs[i];
    return "/tmp";
}

static void probe_mount(void) {
    char dir[256];
    snprintf(dir, sizeof dir, "%s/.probe-mnt-%d", scratch_dir(), getpid());
    mkdir(dir, 0700);
    if (mount("tmpfs", dir, "tmpfs", 0, "size=64k") == 0) {
        umount2(dir, MNT_DETACH);
        put("mount_tmpfs", "mounted");
    } else {
        put("mount_tmpfs", ename(errno));
    }
    rmdir(dir);
}

static void probe_mknod(const char *blockdev) {
    unsigned maj = 7, min = 0; /* a loop device unless the host names its disk */
    char path[256], out[128];
    if (blockdev) sscanf(blockdev, "%u:%u", &maj, &min);
    snprintf(path, sizeof path, "%s/.probe-blk-%d", scratch_dir(), getpid());
    unlink(path);
    if (mknod(path, S_IFBLK | 0600, makedev(maj, min)) != 0) {
        snprintf(out, sizeof out, "mknod %s", ename(errno));
    } else {
        int fd = open(path, O_RDONLY);
        if (fd >= 0) {
            snprintf(out, sizeof out, "opened %u:%u", maj, min);
            close(fd);
        } else {
            snprintf(out, sizeof out, "open %s", ename(errno));
        }
        unlink(path);
    }
    put("mknod_block", out);
}

/* Opened for writing (never written), or why not. */
static void open_write(const char *key, const char *path) {
    int fd = open(path, O_WRONLY);
    if (fd >= 0) {
        put(key, "writable");
        close(fd);
    } else {
        put(key, errno == ENOENT ? "absent" : ename(errno));
    }
}

/* A /proc file runc masks (binds /dev/null or a read-only tmpfs over it). */
static void masked(const char *key, const char *path) {
    struct stat st, proc;
    if (stat("/proc", &proc) != 0) { put(key, "no /proc"); return; }
    int fd = open(path, O_RDONLY);
    if (fd < 0) { put(key, errno == ENOENT ? "absent" : ename(errno)); return; }
    fstat(fd, &st);
    char buf[16];
    ssize_t n = read(fd, buf, sizeof buf);
    close(fd);
    if (S_ISCHR(st.st_mode) || st.st_dev != proc.st_dev) put(key, "masked");
    else if (n > 0) put(key, "readable");
    else put(key, n == 0 ? "empty" : ename(errno));
}

static int is_pid(const char *s) {
    for (; *s; s++) if (*s < '0' || *s > '9') return 0;
    return 1;
}

static void probe_processes(const char *host_pid, const char *token) {
    DIR *d = opendir("/proc");
    int count = 0, marker = 0;
    char path[300], buf[4096], out[64];
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!is_pid(e->d_name)) continue;
            count++;
            if (!token) continue;
            snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
            int fd = open(path, O_RDONLY);
            if (fd < 0) continue;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            for (ssize_t i = 0; i < n; i++) if (!buf[i]) buf[i] = ' ';
            if (n > 0) { buf[n] = 0; if (strstr(buf, token) && atoi(e->d_name) != getpid()) marker = 1; }
        }
        closedir(d);
    }
    snprintf(out, sizeof out, "%d", count);
    put("pids_visible", out);
    put("host_process", !token ? "not probed" : marker ? "visible" : "hidden");
    if (host_pid) {
        int pid = atoi(host_pid);
        put("host_signal", kill(pid, 0) == 0 ? "can signal" : ename(errno));
    } else {
        put("host_signal", "not probed");
    }
    /* PID 1's environment: the host's variables (the suite sets TL_SEC_HOST_ENV) must not show */
    int fd = open("/proc/1/environ", O_RDONLY);
    if (fd < 0) { put("proc1_environ", ename(errno)); }
    else {
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        int host = 0;
        for (ssize_t i = 0; i + 15 < n; i++) if (!memcmp(buf + i, "TL_SEC_HOST_ENV", 15)) host = 1;
        put("proc1_environ", n < 0 ? ename(errno) : host ? "host environment" : "clean");
    }
}

/* "reached" when the server there answers with its greeting, else why not. */
static const char *tcp(const char *addr, int port) {
    static char out[96];
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) return "bad address";
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s < 0) return ename(errno);
    int rc = connect(s, (struct sockaddr *)&sa, sizeof sa);
    if (rc != 0 && errno != EINPROGRESS) { snprintf(out, sizeof out, "%s", ename(errno)); close(s); return out; }
    struct pollfd p = {.fd = s, .events = POLLIN};
    char buf[32] = {0};
    int got = 0;
    for (int waited = 0; waited < 3000; waited += 100) {
        if (poll(&p, 1, 100) > 0) {
            ssize_t n = recv(s, buf, sizeof buf - 1, 0);
            if (n > 0) { got = 1; break; }
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &l);
            snprintf(out, sizeof out, "%s", err ? ename(err) : n == 0 ? "closed" : ename(errno));
            close(s);
            return out;
        }
    }
    close(s);
    if (got && strstr(buf, "tl-sec-ok")) return "reached";
    return got ? "other answer" : "ETIMEDOUT";
}

static void probe_network(const char *lo_port, const char *host_addr, const char *private_addr) {
    char out[256], a[64];
    if (lo_port) {
        int port = atoi(lo_port);
        /* the host's 127.0.0.1: directly (shared network) or through a user-mode stack's gateway */
        const char *direct = tcp("127.0.0.1", port);
        const char *gw = tcp("10.0.2.2", port);
        if (!strcmp(direct, "reached")) snprintf(out, sizeof out, "reached via 127.0.0.1");
        else if (!strcmp(gw, "reached")) snprintf(out, sizeof out, "reached via 10.0.2.2");
        else snprintf(out, sizeof out, "blocked (%s, %s)", direct, gw);
        put("host_loopback_tcp", out);
    }
    const char *pairs[2][2] = {{"host_address_tcp", host_addr}, {"private_range_tcp", private_addr}};
    for (int i = 0; i < 2; i++) {
        if (!pairs[i][1]) continue;
        int port = 0;
        snprintf(a, sizeof a, "%s", pairs[i][1]);
        char *colon = strrchr(a, ':');
        if (colon) { *colon = 0; port = atoi(colon + 1); }
        const char *r = tcp(a, port);
        if (!strcmp(r, "reached")) put(pairs[i][0], "reached");
        else { snprintf(out, sizeof out, "blocked (%s)", r); put(pairs[i][0], out); }
    }
}

static void probe_modules(void) {
    char out[96];
    int fd = open("/dev/null", O_RDONLY);
    long a = syscall(SYS_finit_module, fd, "", 0);
    int ea = errno;
    if (fd >= 0) close(fd);
    long b = syscall(SYS_init_module, NULL, 0, "");
    int eb = errno;
    snprintf(out, sizeof out, "finit %s, init %s", a == 0 ? "LOADED" : ename(ea),
             b == 0 ? "LOADED" : ename(eb));
    put("module_load", out);
}

static void probe_hostname(void) {
    put("sethostname", sethostname("tl-probe", 8) == 0 ? "changed" : ename(errno));
}

static void probe_proc1_root(const char *token) {
    char path[256];
    if (!token) { put("proc1_root_write", "not probed"); return; }
    snprintf(path, sizeof path, "/proc/1/root/tmp/tl-sec-%s", token);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { put("proc1_root_write", ename(errno)); return; }
    if (write(fd, "escaped\n", 8) != 8) { put("proc1_root_write", ename(errno)); close(fd); return; }
    close(fd);
    put("proc1_root_write", "wrote");
}

/* The root mount's overlay work folder (a host path): can it be reached from inside? */
static void probe_overlay(void) {
    FILE *f = fopen("/proc/self/mountinfo", "r");
    char line[8192], work[4096] = "";
    if (!f) { put("overlay_workdir", "no mountinfo"); return; }
    while (fgets(line, sizeof line, f)) {
        char mp[4096];
        if (sscanf(line, "%*s %*s %*s %*s %4095s", mp) != 1 || strcmp(mp, "/")) continue;
        char *w = strstr(line, "workdir=");
        if (w) {
            w += 8;
            size_t n = strcspn(w, ", \n");
            if (n >= sizeof work) n = sizeof work - 1;
            memcpy(work, w, n);
            work[n] = 0;
        }
    }
    fclose(f);
    if (!*work) { put("overlay_workdir", "no overlay root"); return; }
    struct stat st;
    char via[4200];
    snprintf(via, sizeof via, "/proc/1/root%s", work);
    if (stat(work, &st) == 0) put("overlay_workdir", "reachable");
    else if (stat(via, &st) == 0) put("overlay_workdir", "reachable via /proc/1/root");
    else put("overlay_workdir", "hidden");
}

/* Inherited descriptors besides 0-2: what they point at. */
static void probe_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    char out[1024] = "", link[512], path[300];
    int n = 0;
    if (!d) { put("open_fds", "no /proc/self/fd"); return; }
    int self = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!is_pid(e->d_name)) continue;
        int fd = atoi(e->d_name);
        if (fd <= 2 || fd == self) continue;
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t l = readlink(path, link, sizeof link - 1);
        link[l > 0 ? l : 0] = 0;
        size_t used = strlen(out);
        snprintf(out + used, sizeof out - used, "%s%d->%s", n++ ? " " : "", fd, link);
    }
    closedir(d);
    put("open_fds", n ? out : "none");
}

static void probe_forks(const char *limit) {
    int max = limit ? atoi(limit) : 0;
    char out[96];
    if (max <= 0) { put("fork_bomb", "not probed"); return; }
    pid_t *kids = calloc(max, sizeof *kids);
    int n = 0, err = 0;
    for (; n < max; n++) {
        pid_t p = fork();
        if (p == 0) { prctl(PR_SET_PDEATHSIG, SIGKILL); for (;;) pause(); }
        if (p < 0) { err = errno; break; }
        kids[n] = p;
    }
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    free(kids);
    if (n < max) snprintf(out, sizeof out, "held at %d (%s)", n, ename(err));
    else snprintf(out, sizeof out, "unbounded (%d forks)", n);
    put("fork_bomb", out);
}

static int alloc(long mb) {
    for (long i = 0; i < mb; i++) {
        char *p = malloc(1 << 20);
        if (!p) { printf("{\"alloc\": \"malloc failed at %ld MiB\"}\n", i); return 0; }
        for (long j = 0; j < (1 << 20); j += 4096) p[j] = 1;
    }
    printf("{\"alloc\": \"survived\"}\n");
    return 0;
}

int main(int argc, char **argv) {
    const char *host_pid = NULL, *lo_port = NULL, *host_addr = NULL, *private_addr = NULL,
               *token = NULL, *blockdev = NULL, *forks = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--alloc-mb")) return alloc(atol(v));
        else if (!strcmp(k, "--host-pid")) host_pid = v;
        else if (!strcmp(k, "--loopback-port")) lo_port = v;
        else if (!strcmp(k, "--host-addr")) host_addr = v;
        else if (!strcmp(k, "--private")) private_addr = v;
        else if (!strcmp(k, "--token")) token = v;
        else if (!strcmp(k, "--blockdev")) blockdev = v;
        else if (!strcmp(k, "--forks")) forks = v;
        else { fprintf(stderr, "probe: unknown option %s\n", k); return 2; }
    }
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    probe_status();
    probe_uid_map();
    probe_dev_chmod();
    probe_mount();
    probe_mknod(blockdev);
    const char *sys[] = {"/sys/kernel/uevent_helper", "/sys/kernel/profiling",
                         "/sys/kernel/mm/transparent_hugepage/enabled", NULL};
    open_write_any("sys_write", sys);
    /* writable cgroup.procs: a process could move itself out of its limits */
    const char *cg[] = {"/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/pids/cgroup.procs",
                        "/sys/fs/cgroup/memory/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs",
                        NULL};
    open_write_any("sys_cgroup_write", cg);
    masked("proc_kcore", "/proc/kcore");
    masked("proc_keys", "/proc/keys");
    masked("proc_timer_list", "/proc/timer_list");
    open_write("proc_sysrq_trigger", "/proc/sysrq-trigger");
    open_write("proc_sys", "/proc/sys/vm/drop_caches");
    probe_processes(host_pid, token);
    probe_network(lo_port, host_addr, private_addr);
    probe_modules();
    probe_hostname();
    probe_proc1_root(token);
    probe_overlay();
    probe_fds();
    fflush(stdout);
    probe_forks(forks);
    printf("\n}\n");
    return 0;
}
