/*
 * tlimage guest agent: speaks runner/PROTOCOL.md (version 4) over one byte channel.
 *
 * Runs as PID 1's child inside the build microVM (started by runner/init), or on a host for the
 * protocol conformance tests (`agent --stdio`: the channel is fd 0 in / fd 1 out).
 *
 * Contract:
 *   - The agent sends HELLO first, then serves one request at a time per session; every request
 *     gets exactly one terminal reply (OK, ERROR, EXIT or EXPORT_END) after any data frames.
 *   - Sessions (version 4): session 0 is served by the agent itself; every other session by a
 *     worker forked on its first frame, so requests of several sessions run at once (an exec, a
 *     spawned process's output, a terminal, file operations). END ends a session.
 *   - RUN streams the step's stdout and stderr as separate frames, in the order the bytes are read
 *     from the two pipes (no interleaving guarantee beyond that, as with any two pipes).
 *   - Setup failures before exec (bad user, missing workdir, command not found) end in ERROR with a
 *     message, never in EXIT; EXIT always means the step's program ran.
 *   - EXPORT sends the overlay upper directory as a tar stream (busybox tar: whiteouts are 0:0 char
 *     devices, kept as such), then EXPORT_END with the opaque directories and the other xattrs,
 *     because busybox tar carries no xattrs.
 *   - SANDBOX (version 2) turns a build VM into a long-lived sandbox: EXEC, SPAWN, PUT and GET run
 *     chrooted in its root, nothing is killed when a command exits, and the end of the channel
 *     means "wait for the host to come back" (it then sends ATTACH) instead of "shut down".
 *   - BIND (version 3) stacks RUN mounts (a guest path, a tmpfs, or a secret's bytes as a file)
 *     into the mounted root; missing mount points become stubs. UNBIND undoes them all, last
 *     first, and removes the stubs that are still empty, so they never reach the upper.
 *
 * Built statically at provisioning time (gcc -static -Os); depends on nothing in the rootfs being
 * built, which may have no shell, no libc and no Python.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/openat2.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <libgen.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 4
#define MAX_PAYLOAD (1u << 20)
#define CHUNK 65536

enum {
    T_HELLO = 0x01, T_OK = 0x02, T_ERROR = 0x03, T_PATH = 0x04,
    T_STDOUT = 0x10, T_STDERR = 0x11, T_EXIT = 0x12,
    T_TAR = 0x20, T_EXPORT_END = 0x21,
    T_MOUNT = 0x81, T_RUN = 0x82, T_EXPORT = 0x83, T_SHUTDOWN = 0x84, T_KILL = 0x85,
    T_UMOUNT = 0x86,
    /* version 2: sandboxes */
    T_EXEC = 0x87, T_PUT = 0x88, T_GET = 0x89, T_STDIN = 0x8A, T_FREEZE = 0x8B, T_THAW = 0x8C,
    T_ATTACH = 0x8D, T_SPAWN = 0x8E, T_SANDBOX = 0x8F,
    /* version 3: RUN mounts */
    T_BIND = 0x90, T_UNBIND = 0x91,
    /* version 4: sessions, files, PTYs, signals */
    T_PID = 0x05, T_STAT = 0x06,
    T_END = 0x92, T_FS = 0x93, T_PTY = 0x94, T_WINSIZE = 0x95, T_SIGNAL = 0x96,
};
#define T_NONE (-2) /* recv_frame: a frame of another session, routed to its worker */

static int my_session = 0;        /* the session this process answers on (0: the main agent) */
static int is_worker = 0;         /* a session's worker: chan_in is its socket to the agent */
static int lock_fd = -1;          /* a POSIX lock on it makes each frame written whole */

static int chan_in = -1, chan_out = -1;
static int stdio_mode = 0;
static int sandbox_mode = 0;      /* set by SANDBOX: the channel may drop and come back */
static int channel_up = 1;        /* cleared when the host went away (sandbox mode only) */

/* ---- byte buffers and the wire encoding (u32 big-endian lengths) ---- */

typedef struct { unsigned char *p; size_t len, cap; } buf_t;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "tl-agent: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(70);
}

static void buf_put(buf_t *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p) die("out of memory");
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}
static void buf_u32(buf_t *b, uint32_t v) {
    unsigned char x[4] = {v >> 24, v >> 16, v >> 8, v};
    buf_put(b, x, 4);
}
static void buf_str(buf_t *b, const char *s) {
    size_t n = strlen(s);
    buf_u32(b, (uint32_t)n);
    buf_put(b, s, n);
}

typedef struct { const unsigned char *p; size_t len, off; int bad; } rd_t;

static uint32_t rd_u32(rd_t *r) {
    if (r->off + 4 > r->len) { r->bad = 1; return 0; }
    const unsigned char *x = r->p + r->off;
    r->off += 4;
    return ((uint32_t)x[0] << 24) | ((uint32_t)x[1] << 16) | ((uint32_t)x[2] << 8) | x[3];
}
static unsigned rd_u8(rd_t *r) {
    if (r->off + 1 > r->len) { r->bad = 1; return 0; }
    return r->p[r->off++];
}
/* Returns a malloc'd NUL-terminated copy; strings containing NUL are rejected. */
static char *rd_str(rd_t *r) {
    uint32_t n = rd_u32(r);
    if (r->bad || r->off + n > r->len || memchr(r->p + r->off, 0, n)) { r->bad = 1; return strdup(""); }
    char *s = malloc(n + 1);
    memcpy(s, r->p + r->off, n);
    s[n] = 0;
    r->off += n;
    return s;
}
/* A NULL-terminated array of strings. */
static char **rd_strlist(rd_t *r, uint32_t *count) {
    uint32_t n = rd_u32(r);
    if (r->bad || n > MAX_PAYLOAD / 4) { r->bad = 1; n = 0; }
    char **v = calloc(n + 1, sizeof(char *));
    for (uint32_t i = 0; i < n; i++) v[i] = rd_str(r);
    if (count) *count = n;
    return v;
}
static void free_strlist(char **v) {
    for (char **p = v; p && *p; p++) free(*p);
    free(v);
}

/* ---- framing: [type u8][0 u8][0 u16][length u32 BE] then payload ---- */

static int write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}
static int read_all(int fd, void *data, size_t n) {
    char *p = data;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        if (r == 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}
/* In sandbox mode a lost host drops the frames meant for it; a build VM without its host has
 * nothing left to do. */
static void chan_lock(int on) {
    if (lock_fd < 0) return;
    struct flock fl = {.l_type = on ? F_WRLCK : F_UNLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    while (fcntl(lock_fd, F_SETLKW, &fl) < 0 && errno == EINTR) {}
}
static void send_frame_on(unsigned session, unsigned type, const void *payload, size_t n) {
    unsigned char h[8] = {type, 0, session >> 8, session & 0xff, n >> 24, n >> 16, n >> 8, n};
    if (!channel_up) return;
    chan_lock(1);
    int bad = write_all(chan_out, h, 8) < 0 || (n && write_all(chan_out, payload, n) < 0);
    int e = errno;
    chan_lock(0);
    if (bad) {
        if (!sandbox_mode) die("channel write: %s", strerror(e));
        channel_up = 0;
    }
}
static void send_frame(unsigned type, const void *payload, size_t n) {
    send_frame_on((unsigned)my_session, type, payload, n);
}
static void send_buf(unsigned type, buf_t *b) {
    send_frame(type, b->p, b->len);
    free(b->p);
    *b = (buf_t){0};
}
static void send_error(const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    buf_t b = {0};
    buf_str(&b, msg);
    send_buf(T_ERROR, &b);
}
static void route(unsigned session, unsigned type, const unsigned char *h,
                  const unsigned char *payload, size_t n);
/* Reads one frame; returns its type, -1 at end of channel, or T_NONE when the main agent read a
 * frame of another session (it went to that session's worker). *payload is malloc'd unless
 * T_NONE. */
static int recv_frame(unsigned char **payload, size_t *n) {
    unsigned char h[8];
    if (read_all(chan_in, h, 8) < 0) return -1;
    uint32_t len = ((uint32_t)h[4] << 24) | ((uint32_t)h[5] << 16) | ((uint32_t)h[6] << 8) | h[7];
    if (len > MAX_PAYLOAD) die("frame too large: %u bytes", len);
    *payload = malloc(len ? len : 1);
    if (len && read_all(chan_in, *payload, len) < 0) {
        free(*payload);
        return -1;
    }
    *n = len;
    unsigned session = ((unsigned)h[2] << 8) | h[3];
    if (!is_worker && session != 0) {
        route(session, h[0], h, *payload, len);
        free(*payload);
        *payload = NULL;
        return T_NONE;
    }
    return h[0];
}

/* ---- MOUNT / UMOUNT ---- */

static const char *mounted_target = NULL;

static int mkdir_p(const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) < 0 && errno != EEXIST) return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) < 0 && errno != EEXIST) return -1;
    return 0;
}

static void do_mount(rd_t *r) {
    uint32_t nlowers;
    char **lowers = rd_strlist(r, &nlowers);
    char *upper = rd_str(r), *work = rd_str(r), *target = rd_str(r);
    if (r->bad || nlowers == 0) {
        send_error("MOUNT: malformed request");
        goto out;
    }
    struct stat ust, lst;
    int new_upper = lstat(upper, &ust) < 0;
    if (mkdir_p(upper) || mkdir_p(work) || mkdir_p(target)) {
        send_error("MOUNT: mkdir: %s", strerror(errno));
        goto out;
    }
    /* The merged root shows the upper's root: a new upper takes the top lower's owner and mode
     * (a cache mount made for uid 1000, mode 0700 stays so). */
    if (new_upper && stat(lowers[nlowers - 1], &lst) == 0) {
        if (chown(upper, lst.st_uid, lst.st_gid) < 0 || chmod(upper, lst.st_mode & 07777) < 0) {
            send_error("MOUNT: %s: %s", upper, strerror(errno));
            goto out;
        }
    }
    /* overlayfs lists lowerdir top first; the protocol lists lowers bottom first. redirect_dir
     * and metacopy stay off so the upper dir holds only plain files, dirs, whiteouts and opaque
     * markers: exactly what an OCI layer can express. */
    buf_t opts = {0};
    buf_put(&opts, "lowerdir=", 9);
    for (uint32_t i = nlowers; i-- > 0;) {
        buf_put(&opts, lowers[i], strlen(lowers[i]));
        if (i) buf_put(&opts, ":", 1);
    }
    char tail[8192];
    snprintf(tail, sizeof tail, ",upperdir=%s,workdir=%s,redirect_dir=off,metacopy=off,index=off", upper, work);
    buf_put(&opts, tail, strlen(tail) + 1);
    if (mount("overlay", target, "overlay", 0, (char *)opts.p) < 0) {
        send_error("MOUNT: overlay on %s: %s (options %s)", target, strerror(errno), (char *)opts.p);
    } else {
        free((void *)mounted_target);
        mounted_target = strdup(target);
        send_frame(T_OK, NULL, 0);
    }
    free(opts.p);
out:
    free_strlist(lowers);
    free(upper);
    free(work);
    free(target);
}

static void do_umount(rd_t *r) {
    char *target = rd_str(r);
    if (umount2(target, 0) < 0) send_error("UMOUNT %s: %s", target, strerror(errno));
    else send_frame(T_OK, NULL, 0);
    free(target);
}

/* ---- RUN ---- */

/* Mounts made under the step's root for the duration of one RUN, undone in reverse order. A
 * mount point that the rootfs lacks is skipped rather than created: creating it would leak into
 * the layer. */
static char step_mounts[8][4096];
static int n_step_mounts = 0;
static char created_files[4][4096];
static int n_created_files = 0;

static int dir_exists(const char *p) {
    struct stat st;
    return lstat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static void step_mount(const char *root, const char *rel, const char *src, const char *fstype,
                       unsigned long flags, const char *data) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s", root, rel);
    if (!dir_exists(path)) return;
    if (mount(src, path, fstype, flags, data) == 0 && n_step_mounts < 8)
        snprintf(step_mounts[n_step_mounts++], 4096, "%s", path);
}

/* Binds a guest file (resolv.conf, hosts) over the step's copy. When the rootfs has no such file a
 * placeholder is created and removed after the step; a file created and removed in the same upper
 * leaves no trace in it. A dangling symlink (systemd-resolved style) is left alone. */
static void step_bind_file(const char *root, const char *rel, const char *src) {
    char path[4096], etc[4096];
    struct stat st;
    if (access(src, R_OK) != 0) return;
    snprintf(etc, sizeof etc, "%s/etc", root);
    if (!dir_exists(etc)) return;
    snprintf(path, sizeof path, "%s%s", root, rel);
    if (lstat(path, &st) != 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) return;
        close(fd);
        if (n_created_files < 4) snprintf(created_files[n_created_files++], 4096, "%s", path);
    } else if (!S_ISREG(st.st_mode)) {
        return;
    }
    if (mount(src, path, NULL, MS_BIND, NULL) == 0 && n_step_mounts < 8)
        snprintf(step_mounts[n_step_mounts++], 4096, "%s", path);
}

static void step_unmount_all(void) {
    while (n_step_mounts > 0) {
        const char *p = step_mounts[--n_step_mounts];
        if (umount2(p, 0) < 0) umount2(p, MNT_DETACH);
    }
    while (n_created_files > 0) unlink(created_files[--n_created_files]);
}

/* Resolves "user[:group]" (names or numbers) against the step root's /etc/passwd and /etc/group,
 * following Docker's USER rules: a numeric uid need not exist; a named user must; without a group
 * the user's primary group is used and supplementary groups come from /etc/group. Runs after
 * chroot. Returns 0 or writes a message into err. */
static int resolve_user(const char *spec, uid_t *uid, gid_t *gid, gid_t *groups, int *ngroups,
                        char *home, size_t homelen, char *err, size_t errlen) {
    char user[256], group[256] = "";
    const char *colon = strchr(spec, ':');
    if (colon) {
        snprintf(user, sizeof user, "%.*s", (int)(colon - spec), spec);
        snprintf(group, sizeof group, "%s", colon + 1);
    } else {
        snprintf(user, sizeof user, "%s", spec[0] ? spec : "root");
    }
    if (!user[0]) snprintf(user, sizeof user, "root");
    char *end;
    int found = 0;
    char uname[256] = "";
    unsigned long num = strtoul(user, &end, 10);
    int numeric = *end == 0;
    /* A numeric uid absent from /etc/passwd runs with gid 0, as in Docker. */
    *uid = numeric ? (uid_t)num : 0;
    *gid = 0;
    snprintf(home, homelen, "/");
    FILE *f = fopen("/etc/passwd", "r");
    char line[4096];
    while (f && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *rest = line, *fl[7];
        int nf = 0;
        while (nf < 7 && rest) fl[nf++] = strsep(&rest, ":");
        if (nf < 7) continue;
        int match = numeric ? (strtoul(fl[2], NULL, 10) == num) : strcmp(fl[0], user) == 0;
        if (!match) continue;
        found = 1;
        *uid = (uid_t)strtoul(fl[2], NULL, 10);
        *gid = (gid_t)strtoul(fl[3], NULL, 10);
        snprintf(uname, sizeof uname, "%s", fl[0]);
        snprintf(home, homelen, "%s", fl[5][0] ? fl[5] : "/");
        break;
    }
    if (f) fclose(f);
    if (!found && !numeric) {
        snprintf(err, errlen, "unable to find user %s: no matching entries in passwd file", user);
        return -1;
    }
    *ngroups = 0;
    int group_given = group[0] != 0;
    if (group_given) {
        unsigned long g = strtoul(group, &end, 10);
        if (*end == 0) {
            *gid = (gid_t)g;
        } else {
            int gfound = 0;
            FILE *gf = fopen("/etc/group", "r");
            while (gf && fgets(line, sizeof line, gf)) {
                line[strcspn(line, "\n")] = 0;
                char *rest = line, *fl[4];
                int nf = 0;
                while (nf < 4 && rest) fl[nf++] = strsep(&rest, ":");
                if (nf >= 3 && strcmp(fl[0], group) == 0) {
                    *gid = (gid_t)strtoul(fl[2], NULL, 10);
                    gfound = 1;
                    break;
                }
            }
            if (gf) fclose(gf);
            if (!gfound) {
                snprintf(err, errlen, "unable to find group %s: no matching entries in group file", group);
                return -1;
            }
        }
    }
    groups[(*ngroups)++] = *gid;
    if (!group_given && uname[0]) {
        FILE *gf = fopen("/etc/group", "r");
        while (gf && fgets(line, sizeof line, gf) && *ngroups < 64) {
            line[strcspn(line, "\n")] = 0;
            char *rest = line, *fl[4];
            int nf = 0;
            while (nf < 4 && rest) fl[nf++] = strsep(&rest, ":");
            if (nf < 4) continue;
            char *members = fl[3], *m;
            while ((m = strsep(&members, ",")) != NULL) {
                if (strcmp(m, uname) == 0) {
                    gid_t g = (gid_t)strtoul(fl[2], NULL, 10);
                    if (g != *gid) groups[(*ngroups)++] = g;
                    break;
                }
            }
        }
        if (gf) fclose(gf);
    }
    return 0;
}

/* PATH search inside the step root, using the step's PATH (not the agent's). */
static int find_exec(const char *name, const char *path, char *out, size_t outlen) {
    if (strchr(name, '/')) {
        snprintf(out, outlen, "%s", name);
        return access(out, F_OK) == 0 ? 0 : -1;
    }
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    char *rest = copy, *dir;
    while ((dir = strsep(&rest, ":")) != NULL) {
        snprintf(out, outlen, "%s/%s", dir[0] ? dir : ".", name);
        if (access(out, X_OK) == 0) return 0;
    }
    return -1;
}

static pid_t step_pid = -1;

/* The guest kernel's count of OOM kills: a program killed by SIGKILL while it rose was killed for
 * memory, and the host is told so in words (as the namespace backend's cgroup says it). */
static long oom_kills(void) {
    FILE *f = fopen("/proc/vmstat", "re");
    char line[256];
    long n = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "oom_kill %ld", &n) == 1) break;
    if (f) fclose(f);
    return n;
}
static void say_oom(int status, long before) {
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL || before < 0) return;
    if (oom_kills() <= before) return;
    const char *msg = "tlimage: out of memory: the kernel killed the process; exit code 137\n";
    send_frame(T_STDERR, msg, strlen(msg));
}

/* Nothing of the agent's leaks into a program: every descriptor above 2 closes on exec. */
static void close_extra_fds(void) {
    if (syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */) == 0) return;
    for (int fd = 3; fd < 1024; fd++) fcntl(fd, F_SETFD, FD_CLOEXEC);
}

/* A program starts with every signal at its default action and none blocked, whatever the
 * agent inherited (a caller started in the background has SIGINT and SIGQUIT ignored, and an
 * ignored signal stays ignored across exec: Ctrl-C and `kill -INT` would do nothing). */
static void default_signals(void) {
    for (int s = 1; s < NSIG; s++)
        if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void child_fail(int errfd, const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof msg - 1) n = sizeof msg - 1;
    if (write(errfd, msg, (size_t)n) < 0) { /* nothing left to report to */ }
    _exit(127);
}

static void do_run(rd_t *r) {
    char **argv = rd_strlist(r, NULL);
    char **env = rd_strlist(r, NULL);
    char *user = rd_str(r), *workdir = rd_str(r);
    unsigned network = rd_u8(r);
    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, statp[2] = {-1, -1};
    const char *root = mounted_target;
    if (r->bad || !argv[0]) {
        send_error("RUN: malformed request");
        goto out;
    }
    if (!root && !stdio_mode) {
        send_error("RUN before MOUNT");
        goto out;
    }
    if (!root) root = "/";
    if (strcmp(root, "/") != 0) {
        step_mount(root, "/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
        step_mount(root, "/sys", "sysfs", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL);
        step_mount(root, "/dev", "/dev", NULL, MS_BIND | MS_REC, NULL);
        if (network) {
            step_bind_file(root, "/etc/resolv.conf", "/tl/etc/resolv.conf");
            step_bind_file(root, "/etc/hosts", "/tl/etc/hosts");
        }
    }
    if (pipe2(outp, O_CLOEXEC) || pipe2(errp, O_CLOEXEC) || pipe2(statp, O_CLOEXEC)) {
        send_error("RUN: pipe: %s", strerror(errno));
        goto out;
    }
    const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char **e = env; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
    long oom0 = oom_kills();
    pid_t pid = fork();
    if (pid < 0) {
        send_error("RUN: fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        setsid();
        default_signals();
        dup2(outp[1], 1);
        dup2(errp[1], 2);
        int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (devnull >= 0) dup2(devnull, 0);
        if (strcmp(root, "/") != 0 && (chroot(root) < 0 || chdir("/") < 0))
            child_fail(statp[1], "chroot %s: %s", root, strerror(errno));
        uid_t uid;
        gid_t gid, groups[64];
        int ngroups;
        char home[1024], err[1024];
        if (resolve_user(user, &uid, &gid, groups, &ngroups, home, sizeof home, err, sizeof err) < 0)
            child_fail(statp[1], "%s", err);
        const char *wd = workdir[0] ? workdir : "/";
        if (chdir(wd) < 0) child_fail(statp[1], "workdir %s: %s", wd, strerror(errno));
        char exe[4096];
        if (find_exec(argv[0], path, exe, sizeof exe) < 0)
            child_fail(statp[1], "exec: \"%s\": executable file not found in $PATH", argv[0]);
        if (setgroups((size_t)ngroups, groups) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
            child_fail(statp[1], "set user %s: %s", user, strerror(errno));
        close_extra_fds();
        /* HOME follows the user unless the step sets it, as Docker does. */
        int has_home = 0, n = 0;
        for (char **e = env; *e; e++, n++)
            if (strncmp(*e, "HOME=", 5) == 0) has_home = 1;
        char **envp = calloc((size_t)n + 2, sizeof(char *));
        memcpy(envp, env, (size_t)n * sizeof(char *));
        char homevar[1100];
        if (!has_home) {
            snprintf(homevar, sizeof homevar, "HOME=%s", home);
            envp[n] = homevar;
        }
        execve(exe, argv, envp);
        child_fail(statp[1], "exec %s: %s", argv[0], strerror(errno));
    }
    step_pid = pid;
    close(outp[1]);
    close(errp[1]);
    close(statp[1]);
    outp[1] = errp[1] = statp[1] = -1;

    char failmsg[4096];
    ssize_t fl = 0, got;
    while ((got = read(statp[0], failmsg + fl, sizeof failmsg - 1 - (size_t)fl)) > 0) fl += got;
    failmsg[fl > 0 ? fl : 0] = 0;

    unsigned char *chunk = malloc(CHUNK);
    int open_fds = 2;
    struct pollfd pf[3] = {{outp[0], POLLIN, 0}, {errp[0], POLLIN, 0}, {chan_in, POLLIN, 0}};
    while (open_fds > 0) {
        if (poll(pf, 3, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(pf[i].fd, chunk, CHUNK);
            if (n > 0) {
                send_frame(i == 0 ? T_STDOUT : T_STDERR, chunk, (size_t)n);
            } else if (n == 0 || errno != EINTR) {
                close(pf[i].fd);
                if (i == 0) outp[0] = -1; else errp[0] = -1;
                pf[i].fd = -1;
                open_fds--;
            }
        }
        if (pf[2].revents & POLLIN) {
            unsigned char *payload;
            size_t n;
            int t = recv_frame(&payload, &n);
            if (t == T_NONE) { /* another session's */ }
            else if (t < 0) { kill(-pid, SIGKILL); pf[2].fd = -1; }
            else if (t == T_KILL) {
                int sig = n >= 1 ? payload[0] : SIGKILL;
                kill(-pid, sig);
            }
            /* Other requests are not valid while a step runs; the host never sends them. */
            if (t >= 0) free(payload);
        }
    }
    free(chunk);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    step_pid = -1;
    /* Nothing the step started outlives it: in the VM, kill(-1) reaches every process but init
     * and the agent (daemons that left the step's session included), so the upper is quiescent
     * before EXPORT and a reused VM starts the next step clean. On a host (--stdio, tests) only
     * the step's own session is killed. */
    if (stdio_mode) kill(-pid, SIGKILL);
    else kill(-1, SIGKILL);
    if (fl > 0) {
        send_error("%s", failmsg);
    } else {
        say_oom(status, oom0);
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
        buf_t b = {0};
        buf_u32(&b, (uint32_t)code);
        buf_u32(&b, (uint32_t)sig);
        send_buf(T_EXIT, &b);
    }
out:
    step_unmount_all();
    for (int i = 0; i < 2; i++) {
        if (outp[i] >= 0) close(outp[i]);
        if (errp[i] >= 0) close(errp[i]);
        if (statp[i] >= 0) close(statp[i]);
    }
    free_strlist(argv);
    free_strlist(env);
    free(user);
    free(workdir);
}

/* ---- EXPORT ---- */

static buf_t opaque_list, xattr_list;
static uint32_t opaque_count, xattr_count;
static size_t export_root_len;

/* Records the opaque marker and every other xattr except overlayfs' own (trusted.overlay.*),
 * since busybox tar writes no xattrs; security.capability (setcap) must survive into the layer. */
static int collect_meta(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)ftw;
    const char *rel = path + export_root_len;
    while (*rel == '/') rel++;
    if (!rel[0]) rel = ".";
    if (flag == FTW_D && S_ISDIR(st->st_mode)) {
        char v[8];
        ssize_t n = lgetxattr(path, "trusted.overlay.opaque", v, sizeof v);
        if (n == 1 && v[0] == 'y') {
            buf_str(&opaque_list, rel);
            opaque_count++;
        }
    }
    char names[65536];
    ssize_t len = llistxattr(path, names, sizeof names);
    for (ssize_t off = 0; len > 0 && off < len; off += (ssize_t)strlen(names + off) + 1) {
        const char *name = names + off;
        if (strncmp(name, "trusted.overlay.", 16) == 0 || strcmp(name, "security.selinux") == 0)
            continue;
        unsigned char value[65536];
        ssize_t vn = lgetxattr(path, name, value, sizeof value);
        if (vn < 0) continue;
        buf_str(&xattr_list, rel);
        buf_str(&xattr_list, name);
        buf_u32(&xattr_list, (uint32_t)vn);
        buf_put(&xattr_list, value, (size_t)vn);
        xattr_count++;
    }
    return 0;
}

static void do_export(rd_t *r) {
    char *upper = rd_str(r);
    if (r->bad || !dir_exists(upper)) {
        send_error("EXPORT: no such directory: %s", upper);
        free(upper);
        return;
    }
    opaque_list = xattr_list = (buf_t){0};
    opaque_count = xattr_count = 0;
    export_root_len = strlen(upper);
    nftw(upper, collect_meta, 64, FTW_PHYS);

    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        send_error("EXPORT: pipe: %s", strerror(errno));
        free(upper);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 1);
        int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (devnull >= 0) dup2(devnull, 2);
        const char *tar = getenv("TL_TAR");
        execl(tar ? tar : "/bin/busybox", "tar", "-c", "-f", "-", "-C", upper, ".", (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    unsigned char *chunk = malloc(CHUNK);
    ssize_t n;
    while ((n = read(p[0], chunk, CHUNK)) != 0) {
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        send_frame(T_TAR, chunk, (size_t)n);
    }
    free(chunk);
    close(p[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        send_error("EXPORT: tar failed with status %d", status);
    } else {
        buf_t b = {0};
        buf_u32(&b, opaque_count);
        if (opaque_list.len) buf_put(&b, opaque_list.p, opaque_list.len);
        buf_u32(&b, xattr_count);
        if (xattr_list.len) buf_put(&b, xattr_list.p, xattr_list.len);
        send_buf(T_EXPORT_END, &b);
    }
    free(opaque_list.p);
    free(xattr_list.p);
    free(upper);
}

/* ---- BIND / UNBIND (protocol version 3): RUN mounts ---- */

#define MAX_BINDS 64
#define MAX_STUBS 64
enum { BIND_PATH = 0, BIND_TMPFS = 1, BIND_DATA = 2 };

typedef struct {
    char target[4096];
    int nstubs;
    char *stubs[MAX_STUBS]; /* created for this bind, parents first */
} bind_t;
static bind_t binds[MAX_BINDS];
static int n_binds = 0;
static char secrets_dir[256] = "";
static unsigned secret_seq = 0;

/* `path` inside `root`, following symlinks as if `root` were "/" (an absolute or ".."-laden link
 * never leaves it). With create (1: a directory, 2: a file), missing components are made
 * (directories, and the last one as asked) and appended to b->stubs. Returns 0, or -1 with
 * errno set. */
static int resolve_in_root(const char *root, const char *path, int create, char *out,
                           size_t outlen, bind_t *b) {
    char todo[8192], done[4096] = "", full[8192], name[4096], rest[8192], joined[8192];
    int hops = 0;
/* A path that does not fit is an error, never silently cut. */
#define FIT(buf, ...) do { int n_ = snprintf(buf, sizeof buf, __VA_ARGS__); \
        if (n_ < 0 || (size_t)n_ >= sizeof buf) { errno = ENAMETOOLONG; return -1; } } while (0)
    FIT(todo, "%s", path);
    for (;;) {
        char *p = todo;
        while (*p == '/') p++;
        if (!*p) break;
        char *slash = strchr(p, '/');
        if (slash) {
            FIT(name, "%.*s", (int)(slash - p), p);
            FIT(rest, "%s", slash);
        } else {
            FIT(name, "%s", p);
            rest[0] = 0;
        }
        memcpy(todo, rest, strlen(rest) + 1);
        if (strcmp(name, ".") == 0) continue;
        if (strcmp(name, "..") == 0) {
            char *last = strrchr(done, '/');
            if (last) *last = 0; else done[0] = 0;
            continue;
        }
        FIT(full, "%s/%s/%s", root, done, name);
        struct stat st;
        if (lstat(full, &st) < 0) {
            if (errno != ENOENT || !create) return -1;
            int last = todo[strspn(todo, "/")] == 0;
            if (!last || create == 1) {
                if (mkdir(full, 0755) < 0) return -1;
            } else {
                int fd = open(full, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
                if (fd < 0) return -1;
                close(fd);
            }
            if (b->nstubs >= MAX_STUBS) { errno = ENOSPC; return -1; }
            b->stubs[b->nstubs++] = strdup(full);
        } else if (S_ISLNK(st.st_mode)) {
            char link[4096];
            ssize_t n = readlink(full, link, sizeof link - 1);
            if (n < 0) return -1;
            link[n] = 0;
            if (++hops > 40) { errno = ELOOP; return -1; }
            if (link[0] == '/') done[0] = 0;
            FIT(joined, "%s/%s", link, todo);
            memcpy(todo, joined, strlen(joined) + 1);
            continue;
        }
        FIT(joined, "%s%s%s", done, done[0] ? "/" : "", name);
        FIT(done, "%s", joined);
    }
    int n = snprintf(out, outlen, "%s/%s", root, done);
    if (n < 0 || (size_t)n >= outlen) { errno = ENAMETOOLONG; return -1; }
    return 0;
#undef FIT
}

/* Stubs still empty go (deepest first); one the step filled stays, and so do its parents. */
static void remove_stubs(bind_t *b) {
    while (b->nstubs > 0) {
        char *p = b->stubs[--b->nstubs];
        struct stat st;
        if (lstat(p, &st) == 0) {
            if (S_ISDIR(st.st_mode)) rmdir(p);
            else if (S_ISREG(st.st_mode) && st.st_size == 0) unlink(p);
        }
        free(p);
    }
}

/* Secrets live on a tmpfs of the agent's own, never on a disk. */
static int secret_file(const unsigned char *data, size_t n, unsigned uid, unsigned gid,
                       unsigned mode, char *out, size_t outlen) {
    if (!secrets_dir[0]) {
        if (stdio_mode) snprintf(secrets_dir, sizeof secrets_dir, "/tmp/.tl-secrets-%d", (int)getpid());
        else snprintf(secrets_dir, sizeof secrets_dir, "/tl/secrets");
        if ((mkdir(secrets_dir, 0700) < 0 && errno != EEXIST) ||
            mount("tmpfs", secrets_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=700") < 0) {
            int e = errno;
            rmdir(secrets_dir);
            secrets_dir[0] = 0;
            errno = e;
            return -1;
        }
    }
    snprintf(out, outlen, "%s/%u", secrets_dir, secret_seq++);
    int fd = open(out, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    int ok = write_all(fd, data, n) == 0 && fchown(fd, uid, gid) == 0 && fchmod(fd, mode) == 0;
    int e = errno;
    close(fd);
    errno = e;
    return ok ? 0 : -1;
}

static void do_bind(rd_t *r) {
    char *root = rd_str(r), *target = rd_str(r);
    unsigned kind = rd_u8(r);
    char *source_root = rd_str(r), *source = rd_str(r);
    unsigned readonly = rd_u8(r);
    uint32_t size_kib = rd_u32(r), uid = rd_u32(r), gid = rd_u32(r), mode = rd_u32(r);
    uint32_t dlen = rd_u32(r);
    const unsigned char *data = r->p + r->off;
    if (!r->bad && r->off + dlen <= r->len) r->off += dlen; else r->bad = 1;
    char src[4096] = "", dst[4096];
    int is_dir = 1;
    if (r->bad || r->off != r->len || kind > BIND_DATA || target[0] != '/') {
        send_error("BIND: malformed request");
        goto out;
    }
    if (n_binds >= MAX_BINDS) {
        send_error("BIND: more than %d mounts", MAX_BINDS);
        goto out;
    }
    if (kind == BIND_PATH) {
        struct stat st;
        if (resolve_in_root(source_root, source, 0, src, sizeof src, NULL) < 0 || stat(src, &st) < 0) {
            send_error("BIND: source %s: %s", source, strerror(errno));
            goto out;
        }
        is_dir = S_ISDIR(st.st_mode);
    } else if (kind == BIND_DATA) {
        if (secret_file(data, dlen, uid, gid, mode, src, sizeof src) < 0) {
            send_error("BIND: secret file: %s", strerror(errno));
            goto out;
        }
        is_dir = 0;
    }
    bind_t *b = &binds[n_binds];
    b->nstubs = 0;
    if (resolve_in_root(root, target, is_dir ? 1 : 2, dst, sizeof dst, b) < 0) {
        send_error("BIND: mount target %s: %s", target, strerror(errno));
        remove_stubs(b);
        goto out;
    }
    int rc;
    if (kind == BIND_TMPFS) {
        char opts[64] = "mode=1777";
        if (size_kib) snprintf(opts, sizeof opts, "mode=1777,size=%uk", size_kib);
        rc = mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, opts);
    } else {
        rc = mount(src, dst, NULL, MS_BIND, NULL);
        if (rc == 0 && (readonly || kind == BIND_DATA) &&
            mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0) {
            int e = errno;
            umount2(dst, MNT_DETACH);
            errno = e;
            rc = -1;
        }
    }
    if (rc < 0) {
        send_error("BIND: cannot mount %s at %s: %s",
                   kind == BIND_TMPFS ? "tmpfs" : kind == BIND_DATA ? "secret" : "bind", target,
                   strerror(errno));
        remove_stubs(b);
        goto out;
    }
    snprintf(b->target, sizeof b->target, "%s", dst);
    n_binds++;
    send_frame(T_OK, NULL, 0);
out:
    free(root);
    free(target);
    free(source_root);
    free(source);
}

static void do_unbind(void) {
    while (n_binds > 0) {
        bind_t *b = &binds[--n_binds];
        if (umount2(b->target, 0) < 0) umount2(b->target, MNT_DETACH);
        remove_stubs(b);
    }
    if (secrets_dir[0]) {
        if (umount2(secrets_dir, 0) < 0) umount2(secrets_dir, MNT_DETACH);
        rmdir(secrets_dir);
        secrets_dir[0] = 0;
    }
    send_frame(T_OK, NULL, 0);
}

/* ---- sandboxes (protocol version 2) ---- */

static char *sandbox_root = NULL; /* where EXEC, SPAWN, PUT and GET run, chrooted */
static pid_t entry_pid = -1;      /* SPAWN's program: its exit ends the VM */
static int sigchld_pipe[2] = {-1, -1};

static void on_sigchld(int sig) {
    (void)sig;
    int saved = errno;
    if (write(sigchld_pipe[1], "c", 1) < 0) { /* full: a wake-up is already pending */ }
    errno = saved;
}

static void drain_fd(int fd) {
    char b[256];
    while (read(fd, b, sizeof b) > 0) {}
}

/* The entrypoint's exit ends the sandbox: the status goes to the console (the host's log), then
 * the VM resets, which ends QEMU (-no-reboot). */
static void check_entry(void) {
    int status;
    if (entry_pid <= 0 || waitpid(entry_pid, &status, WNOHANG) != entry_pid) return;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    entry_pid = -1;
    int con = stdio_mode ? dup(2) : open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (con >= 0) {
        dprintf(con, "tl-agent: entrypoint exited with status %d\n", code);
        close(con);
    }
    if (stdio_mode) return;
    sync();
    reboot(RB_AUTOBOOT);
}

static const char *exec_root(void) {
    return sandbox_root ? sandbox_root : (stdio_mode ? "/" : NULL);
}

static void perm_mount(const char *root, const char *rel, const char *src, const char *fstype,
                       unsigned long flags, const char *data) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s", root, rel);
    if (dir_exists(path)) mount(src, path, fstype, flags, data);
}

/* As step_bind_file, but for the sandbox's whole life: a placeholder stays in the upper (the
 * host leaves empty placeholders out of snapshots). */
static void perm_bind_file(const char *root, const char *rel, const char *src) {
    char path[4096], etc[4096];
    struct stat st;
    snprintf(etc, sizeof etc, "%s/etc", root);
    if (access(src, R_OK) != 0 || !dir_exists(etc)) return;
    snprintf(path, sizeof path, "%s%s", root, rel);
    if (lstat(path, &st) != 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) return;
        close(fd);
    } else if (!S_ISREG(st.st_mode)) {
        return;
    }
    mount(src, path, NULL, MS_BIND, NULL);
}

/* Set when the VM boots the image's own init (runner/init, tl.init=systemd): the write end of a
 * pipe PID 1 reads. After SANDBOX has mounted the root, the agent writes the root's path there,
 * PID 1 chroots into it and execs /sbin/init (so systemd is PID 1 and the agent its child, in
 * the root cgroup, which systemd leaves alone), and the agent waits for systemd's private bus
 * socket before it answers, so `systemctl` works from the first EXEC on. */
static int init_fd = -1;
static int init_booted = 0; /* PID 1 is the root's init: SHUTDOWN asks it to reboot */
#define INIT_WAIT_SECONDS 150

static int start_init(const char *root) {
    char path[4096], sock[4096];
    struct stat st;
    if (resolve_in_root(root, "/sbin/init", 0, path, sizeof path, NULL) < 0 || stat(path, &st) < 0
        || !S_ISREG(st.st_mode) || !(st.st_mode & 0111)) {
        send_error("SANDBOX: the image boots its own init, but it has no /sbin/init");
        return -1;
    }
    dprintf(init_fd, "%s\n", root);
    close(init_fd);
    init_fd = -1;
    init_booted = 1;
    snprintf(sock, sizeof sock, "%s/run/systemd/private", root);
    for (int i = 0; i < INIT_WAIT_SECONDS * 20; i++) {
        if (stat(sock, &st) == 0 && S_ISSOCK(st.st_mode)) return 0;
        usleep(50000);
    }
    send_error("SANDBOX: systemd did not open %s within %d s", sock + strlen(root),
               INIT_WAIT_SECONDS);
    return -1;
}

static void do_sandbox(rd_t *r) {
    char *root = rd_str(r);
    unsigned network = rd_u8(r);
    char *hostname = rd_str(r);
    if (r->bad || root[0] != '/') {
        send_error("SANDBOX: malformed request");
    } else if (!stdio_mode && (!mounted_target || strcmp(root, mounted_target) != 0)) {
        send_error("SANDBOX: %s is not the mounted root", root);
    } else {
        if (strcmp(root, "/") != 0) {
            perm_mount(root, "/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
            /* systemd (and udev) write to /sys; the agent's own commands get it read-only */
            perm_mount(root, "/sys", "sysfs", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC |
                       (init_fd >= 0 ? 0 : MS_RDONLY), NULL);
            perm_mount(root, "/dev", "/dev", NULL, MS_BIND | MS_REC, NULL);
            if (network) {
                perm_bind_file(root, "/etc/resolv.conf", "/tl/etc/resolv.conf");
                perm_bind_file(root, "/etc/hosts", "/tl/etc/hosts");
            }
        }
        if (!stdio_mode && hostname[0] && sethostname(hostname, strlen(hostname)) < 0) {
            /* a name the kernel refuses (too long) keeps the old one */
        }
        free(sandbox_root);
        sandbox_root = strdup(root);
        sandbox_mode = 1;
        if (init_fd < 0 || start_init(root) == 0) send_frame(T_OK, NULL, 0);
    }
    free(root);
    free(hostname);
}

/* The child side of EXEC and SPAWN: chroot, user, workdir, PATH lookup, exec. Failures go to
 * statfd and end in exit 127; statfd is close-on-exec, so EOF without a message means it ran. */
static void exec_child(const char *root, char **argv, char **env, const char *user,
                       const char *workdir, int statfd) {
    setsid();
    default_signals();
    const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    for (char **e = env; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
    if (strcmp(root, "/") != 0 && (chroot(root) < 0 || chdir("/") < 0))
        child_fail(statfd, "chroot %s: %s", root, strerror(errno));
    uid_t uid;
    gid_t gid, groups[64];
    int ngroups;
    char home[1024], err[1024];
    if (resolve_user(user, &uid, &gid, groups, &ngroups, home, sizeof home, err, sizeof err) < 0)
        child_fail(statfd, "%s", err);
    const char *wd = workdir[0] ? workdir : "/";
    if (chdir(wd) < 0) child_fail(statfd, "workdir %s: %s", wd, strerror(errno));
    char exe[4096];
    if (find_exec(argv[0], path, exe, sizeof exe) < 0)
        child_fail(statfd, "exec: \"%s\": executable file not found in $PATH", argv[0]);
    if (setgroups((size_t)ngroups, groups) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
        child_fail(statfd, "set user %s: %s", user, strerror(errno));
    close_extra_fds();
    int has_home = 0, n = 0;
    for (char **e = env; *e; e++, n++)
        if (strncmp(*e, "HOME=", 5) == 0) has_home = 1;
    char **envp = calloc((size_t)n + 2, sizeof(char *));
    memcpy(envp, env, (size_t)n * sizeof(char *));
    char homevar[1100];
    if (!has_home) {
        snprintf(homevar, sizeof homevar, "HOME=%s", home);
        envp[n] = homevar;
    }
    execve(exe, argv, envp);
    child_fail(statfd, "exec %s: %s", argv[0], strerror(errno));
}

static ssize_t read_msg(int fd, char *msg, size_t cap) {
    ssize_t fl = 0, got;
    while ((got = read(fd, msg + fl, cap - 1 - (size_t)fl)) != 0) {
        if (got < 0) {
            if (errno == EINTR) continue;
            break;
        }
        fl += got;
    }
    msg[fl > 0 ? fl : 0] = 0;
    return fl;
}

/* After fork: the child writes a setup failure (bad user, missing workdir, no such program) on
 * the status pipe, which closes unread on a successful exec. On a failure the child is reaped
 * and the message sent as ERROR; returns 0 when the program runs. */
static int child_started(int statfd, pid_t pid) {
    char failmsg[4096];
    if (read_msg(statfd, failmsg, sizeof failmsg) <= 0) return 0;
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    send_error("%s", failmsg);
    return -1;
}

static void send_pid(pid_t pid) {
    buf_t msg = {0};
    buf_u32(&msg, (uint32_t)pid);
    send_buf(T_PID, &msg);
}

/* EXEC: like RUN, in the sandbox root, but nothing else is killed when the program exits, and
 * EXIT follows the program's exit (with the output it left in the pipes), not the pipes' end:
 * a background process that keeps them open holds nothing. */
static void do_exec(rd_t *r) {
    char **argv = rd_strlist(r, NULL);
    char **env = rd_strlist(r, NULL);
    char *user = rd_str(r), *workdir = rd_str(r);
    unsigned flags = rd_u8(r);
    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, statp[2] = {-1, -1}, inp[2] = {-1, -1};
    const char *root = exec_root();
    buf_t pending = {0};
    size_t sent = 0;
    unsigned char *chunk = NULL;
    if (r->bad || !argv[0]) {
        send_error("EXEC: malformed request");
        goto out;
    }
    if (!root) {
        send_error("EXEC before SANDBOX");
        goto out;
    }
    if (pipe2(outp, O_CLOEXEC) || pipe2(errp, O_CLOEXEC) || pipe2(statp, O_CLOEXEC) ||
        ((flags & 1) && pipe2(inp, O_CLOEXEC))) {
        send_error("EXEC: pipe: %s", strerror(errno));
        goto out;
    }
    long oom0 = oom_kills();
    pid_t pid = fork();
    if (pid < 0) {
        send_error("EXEC: fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        dup2(outp[1], 1);
        dup2(errp[1], 2);
        if (flags & 1) {
            dup2(inp[0], 0);
        } else {
            int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (devnull >= 0) dup2(devnull, 0);
        }
        exec_child(root, argv, env, user, workdir, statp[1]);
    }
    close(outp[1]);
    close(errp[1]);
    close(statp[1]);
    outp[1] = errp[1] = statp[1] = -1;
    if (inp[0] >= 0) {
        close(inp[0]);
        inp[0] = -1;
        fcntl(inp[1], F_SETFL, O_NONBLOCK);
    }
    if (child_started(statp[0], pid) < 0) goto out;
    send_pid(pid);

    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    int status = 0, exited = 0, stdin_eof = 0;
    chunk = malloc(CHUNK);
    while (!exited) {
        struct pollfd pf[5] = {
            {outp[0], POLLIN, 0}, {errp[0], POLLIN, 0},
            {channel_up ? chan_in : -1, POLLIN, 0}, {pidfd, POLLIN, 0},
            {inp[1] >= 0 && pending.len > sent ? inp[1] : -1, POLLOUT, 0},
        };
        if (poll(pf, 5, pidfd >= 0 ? -1 : 20) < 0 && errno != EINTR) break;
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(pf[i].fd, chunk, CHUNK);
            if (n > 0) {
                send_frame(i == 0 ? T_STDOUT : T_STDERR, chunk, (size_t)n);
            } else if (n == 0 || errno != EINTR) {
                close(pf[i].fd);
                if (i == 0) outp[0] = -1; else errp[0] = -1;
            }
        }
        if (pf[2].revents & (POLLIN | POLLHUP | POLLERR)) {
            unsigned char *payload;
            size_t n;
            int t = (pf[2].revents & POLLIN) && !(pf[2].revents & POLLHUP)
                        ? recv_frame(&payload, &n) : -1;
            if (t == T_NONE) {
                /* another session's frame */
            } else if (t < 0) {
                kill(-pid, SIGKILL); /* the host (or the session) is gone: so is the command */
                channel_up = 0;
            } else {
                if (t == T_KILL) kill(-pid, n >= 1 ? payload[0] : SIGKILL);
                if (t == T_STDIN && inp[1] >= 0) {
                    if (n == 0) stdin_eof = 1;
                    else buf_put(&pending, payload, n);
                }
                free(payload);
            }
        }
        if (pf[4].fd >= 0 && (pf[4].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(inp[1], pending.p + sent, pending.len - sent);
            if (w > 0) sent += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR) sent = pending.len; /* EPIPE */
        }
        if (inp[1] >= 0 && stdin_eof && sent == pending.len) {
            close(inp[1]);
            inp[1] = -1;
        }
        if (waitpid(pid, &status, WNOHANG) == pid) exited = 1;
    }
    if (pidfd >= 0) close(pidfd);
    if (!exited) while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    /* What the program wrote before it exited is in the pipes: send it, then stop reading. */
    for (int i = 0; i < 2; i++) {
        int fd = i == 0 ? outp[0] : errp[0];
        if (fd < 0) continue;
        fcntl(fd, F_SETFL, O_NONBLOCK);
        ssize_t n;
        while ((n = read(fd, chunk, CHUNK)) > 0) send_frame(i == 0 ? T_STDOUT : T_STDERR, chunk, (size_t)n);
    }
    say_oom(status, oom0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    buf_t b = {0};
    buf_u32(&b, (uint32_t)code);
    buf_u32(&b, (uint32_t)sig);
    send_buf(T_EXIT, &b);
out:
    free(chunk);
    free(pending.p);
    int *fds[] = {outp, errp, statp, inp};
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++)
            if (fds[i][j] >= 0) close(fds[i][j]);
    free_strlist(argv);
    free_strlist(env);
    free(user);
    free(workdir);
}

/* SPAWN: starts the sandbox's main program in the background, its output on the console. */
static void do_spawn(rd_t *r) {
    char **argv = rd_strlist(r, NULL);
    char **env = rd_strlist(r, NULL);
    char *user = rd_str(r), *workdir = rd_str(r);
    rd_u8(r);
    int statp[2] = {-1, -1};
    const char *root = exec_root();
    if (r->bad || !argv[0]) {
        send_error("SPAWN: malformed request");
    } else if (!root) {
        send_error("SPAWN before SANDBOX");
    } else if (entry_pid > 0) {
        send_error("SPAWN: the entrypoint is already running");
    } else if (pipe2(statp, O_CLOEXEC) < 0) {
        send_error("SPAWN: pipe: %s", strerror(errno));
    } else {
        pid_t pid = fork();
        if (pid == 0) {
            int con = stdio_mode ? fcntl(2, F_DUPFD_CLOEXEC, 3) : open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
            int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (devnull >= 0) dup2(devnull, 0);
            if (con >= 0) {
                dup2(con, 1);
                dup2(con, 2);
            }
            exec_child(root, argv, env, user, workdir, statp[1]);
        }
        close(statp[1]);
        if (pid < 0) {
            send_error("SPAWN: fork: %s", strerror(errno));
        } else if (child_started(statp[0], pid) == 0) {
            entry_pid = pid;
            send_frame(T_OK, NULL, 0);
        }
        close(statp[0]);
    }
    free_strlist(argv);
    free_strlist(env);
    free(user);
    free(workdir);
}

static void do_attach(rd_t *r) {
    uint64_t hi = rd_u32(r), lo = rd_u32(r);
    if (r->bad) {
        send_error("ATTACH: malformed request");
        return;
    }
    uint64_t ns = (hi << 32) | lo;
    if (!stdio_mode && ns) {
        struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
        clock_settime(CLOCK_REALTIME, &ts);
    }
    buf_t hello = {0};
    unsigned char v[2] = {PROTOCOL_VERSION >> 8, PROTOCOL_VERSION & 0xff};
    buf_put(&hello, v, 2);
    buf_str(&hello, "tl-agent");
    send_buf(T_HELLO, &hello);
}

/* busybox (the initramfs's, or $TL_TAR's) runs the archives inside the chroot through an fd
 * opened before it: the sandbox's rootfs need not have a tar. */
static int open_busybox(void) {
    const char *tar = getenv("TL_TAR");
    return open(tar ? tar : "/bin/busybox", O_RDONLY | O_CLOEXEC);
}

static void report_fail(int fd, const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg + 1, sizeof msg - 1, fmt, ap);
    va_end(ap);
    msg[0] = 'E';
    if (n > (int)sizeof msg - 2) n = sizeof msg - 2;
    if (write(fd, msg, (size_t)n + 1) < 0) { /* nothing left to report to */ }
    _exit(127);
}

static char *const no_env[] = {"PATH=/bin", NULL};

/* PUT: the host's archive lands at `dest` (inside it when it is a directory, with `name`). */
static void do_put(rd_t *r) {
    char *dest = rd_str(r), *name = rd_str(r);
    const char *root = exec_root();
    int rep[2] = {-1, -1}, inp[2] = {-1, -1}, errp[2] = {-1, -1}, bb = -1;
    if (r->bad || dest[0] != '/' || !name[0] || strchr(name, '/')) {
        send_error("PUT: malformed request");
        goto out;
    }
    if (!root) {
        send_error("PUT before SANDBOX");
        goto out;
    }
    if ((bb = open_busybox()) < 0 || pipe2(rep, O_CLOEXEC) || pipe2(inp, O_CLOEXEC) ||
        pipe2(errp, O_CLOEXEC)) {
        send_error("PUT: %s", strerror(errno));
        goto out;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(inp[0], 0);
        dup2(errp[1], 1);
        dup2(errp[1], 2);
        if (strcmp(root, "/") != 0 && (chroot(root) < 0 || chdir("/") < 0))
            report_fail(rep[1], "chroot %s: %s", root, strerror(errno));
        char target[4096], parent[4096];
        struct stat st;
        size_t dl = strlen(dest);
        while (dl > 1 && dest[dl - 1] == '/' && dest[dl - 2] == '/') dest[--dl] = 0;
        if (stat(dest, &st) == 0 && S_ISDIR(st.st_mode)) {
            while (dl > 0 && dest[dl - 1] == '/') dest[--dl] = 0;
            snprintf(target, sizeof target, "%s/%s", dest, name);
        } else if (dest[dl - 1] == '/') {
            report_fail(rep[1], "%s: no such directory in the sandbox", dest);
        } else {
            snprintf(target, sizeof target, "%s", dest);
        }
        snprintf(parent, sizeof parent, "%s", target);
        char *dir = dirname(parent);
        if (chdir(dir) < 0) report_fail(rep[1], "%s: no such directory in the sandbox", dir);
        char msg[4100];
        int n = snprintf(msg, sizeof msg, "T%s", target);
        if (write(rep[1], msg, (size_t)n) < 0) _exit(127);
        umask(0);
        char *args[] = {"tar", "-x", "--numeric-owner", "-f", "-", NULL};
        fexecve(bb, args, no_env);
        report_fail(rep[1], "exec tar: %s", strerror(errno));
    }
    close(rep[1]);
    close(inp[0]);
    close(errp[1]);
    rep[1] = inp[0] = errp[1] = -1;
    char msg[4200];
    if (pid < 0 || read_msg(rep[0], msg, sizeof msg) <= 0 || msg[0] != 'T') {
        if (pid > 0) while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        send_error("PUT: %s", pid < 0 ? strerror(errno) : msg[0] ? msg + 1 : "tar failed to start");
        goto out;
    }
    buf_t b = {0};
    buf_str(&b, msg + 1);
    send_buf(T_PATH, &b);
    int ok = 1;
    for (;;) {
        unsigned char *payload;
        size_t n;
        int t = recv_frame(&payload, &n);
        if (t == T_NONE) continue;
        if (t < 0) {
            kill(pid, SIGKILL);
            channel_up = 0;
            ok = 0;
            break;
        }
        int end = t != T_TAR || n == 0;
        if (t == T_TAR && n && ok && write_all(inp[1], payload, n) < 0) ok = 0;
        free(payload);
        if (end) {
            if (t != T_TAR) ok = 0;
            break;
        }
    }
    close(inp[1]);
    inp[1] = -1;
    char errmsg[4096];
    read_msg(errp[0], errmsg, sizeof errmsg);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (ok && WIFEXITED(status) && WEXITSTATUS(status) == 0) send_frame(T_OK, NULL, 0);
    else send_error("PUT: tar -x failed (status %d): %s", status, errmsg);
out:
    if (bb >= 0) close(bb);
    int *fds[] = {rep, inp, errp};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 2; j++)
            if (fds[i][j] >= 0) close(fds[i][j]);
    free(dest);
    free(name);
}

/* GET: `path` as a tar stream whose top entry is its base name ("." for the root). */
static void do_get(rd_t *r) {
    char *path = rd_str(r);
    const char *root = exec_root();
    int rep[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1}, bb = -1;
    if (r->bad || path[0] != '/') {
        send_error("GET: malformed request");
        goto out;
    }
    if (!root) {
        send_error("GET before SANDBOX");
        goto out;
    }
    if ((bb = open_busybox()) < 0 || pipe2(rep, O_CLOEXEC) || pipe2(outp, O_CLOEXEC) ||
        pipe2(errp, O_CLOEXEC)) {
        send_error("GET: %s", strerror(errno));
        goto out;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(outp[1], 1);
        dup2(errp[1], 2);
        int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (devnull >= 0) dup2(devnull, 0);
        if (strcmp(root, "/") != 0 && (chroot(root) < 0 || chdir("/") < 0))
            report_fail(rep[1], "chroot %s: %s", root, strerror(errno));
        struct stat st;
        if (lstat(path, &st) < 0) report_fail(rep[1], "%s: %s", path, strerror(errno));
        char d[4096], b[4096];
        snprintf(d, sizeof d, "%s", path);
        snprintf(b, sizeof b, "%s", path);
        char *dir = dirname(d), *base = basename(b);
        if (strcmp(base, "/") == 0) base = ".";
        if (chdir(dir) < 0) report_fail(rep[1], "%s: %s", dir, strerror(errno));
        if (write(rep[1], "T", 1) < 0) _exit(127);
        char *args[] = {"tar", "-c", "-f", "-", base, NULL};
        fexecve(bb, args, no_env);
        report_fail(rep[1], "exec tar: %s", strerror(errno));
    }
    close(rep[1]);
    close(outp[1]);
    close(errp[1]);
    rep[1] = outp[1] = errp[1] = -1;
    char msg[4200];
    if (pid < 0 || read_msg(rep[0], msg, sizeof msg) <= 0 || msg[0] != 'T') {
        if (pid > 0) while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
        send_error("GET: %s", pid < 0 ? strerror(errno) : msg[0] ? msg + 1 : "tar failed to start");
        goto out;
    }
    unsigned char *chunk = malloc(CHUNK);
    ssize_t n;
    while ((n = read(outp[0], chunk, CHUNK)) != 0) {
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        send_frame(T_TAR, chunk, (size_t)n);
    }
    free(chunk);
    char errmsg[4096];
    read_msg(errp[0], errmsg, sizeof errmsg);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) send_frame(T_OK, NULL, 0);
    else send_error("GET: tar -c failed (status %d): %s", status, errmsg);
out:
    if (bb >= 0) close(bb);
    int *fds[] = {rep, outp, errp};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 2; j++)
            if (fds[i][j] >= 0) close(fds[i][j]);
    free(path);
}

/* ---- version 4: FREEZE/THAW without the agent, SIGNAL, FS, PTY ---- */

static int frozen = 0; /* this process sent FREEZE and no THAW yet */

/* Whether `pid` runs the agent's own program (the main agent or a session's worker). */
static int is_agent_process(pid_t pid) {
    struct stat self, st;
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
    return stat("/proc/self/exe", &self) == 0 && stat(path, &st) == 0 && st.st_dev == self.st_dev &&
           st.st_ino == self.st_ino;
}

/* SIGSTOP / SIGCONT to every guest process but init and the agent's own (kill(-1) would stop the
 * agent's session workers too). Two passes catch what forked during the first. */
static void signal_guest(int sig) {
    if (stdio_mode) return;
    for (int pass = 0; pass < 2; pass++) {
        DIR *d = opendir("/proc");
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            char *end;
            long p = strtol(e->d_name, &end, 10);
            if (*end || p <= 1 || p == getpid() || is_agent_process((pid_t)p)) continue;
            kill((pid_t)p, sig);
        }
        if (d) closedir(d);
    }
}
static void do_freeze(int on) {
    if (on) sync();
    signal_guest(on ? SIGSTOP : SIGCONT);
    frozen = on;
    send_frame(T_OK, NULL, 0);
}

/* SIGNAL: a signal to one process of the sandbox (a spawned process, by the pid EXEC reported). */
static void do_signal(rd_t *r) {
    uint32_t pid = rd_u32(r);
    unsigned sig = rd_u8(r);
    if (r->bad || r->off != r->len || pid <= 1 || pid > 0x3fffffff || sig > 64) {
        send_error("SIGNAL: malformed request");
    } else if (is_agent_process((pid_t)pid)) {
        send_error("SIGNAL: process %u is not the sandbox's", pid);
    } else if (kill((pid_t)pid, (int)sig) < 0) {
        send_error("SIGNAL: process %u: %s", pid, strerror(errno));
    } else {
        send_frame(T_OK, NULL, 0);
    }
}

/* ---- FS: file operations inside the sandbox root ---- */

enum { FS_STAT = 0, FS_LIST = 1, FS_MKDIR = 2, FS_REMOVE = 3 };
enum { FSF_FOLLOW = 1, FSF_MISSING_OK = 2, FSF_RECURSIVE = 4, FSF_PARENTS = 8 };

/* `path` opened below `rootfd` as if it were "/": symlinks (absolute ones and ".." included)
 * never leave the root and /proc's magic links are refused (openat2 RESOLVE_IN_ROOT). */
static int open_in_root(int rootfd, const char *path, int flags, int follow) {
    struct open_how how = {0};
    how.flags = (uint64_t)(flags | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
    how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
    const char *p = path;
    while (*p == '/') p++;
    long fd;
    do fd = syscall(SYS_openat2, rootfd, *p ? p : ".", &how, sizeof how);
    while (fd < 0 && errno == EAGAIN);
    return (int)fd;
}

/* The path made plain: no empty, "." or ".." components (".." stops at the root), as "/a/b";
 * *base points at its last component ("" for the root). */
static int fs_normalize(const char *path, char *out, size_t cap, char **base) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) return -1;
    size_t len = 0;
    out[0] = 0;
    char *save, *c = strtok_r(tmp, "/", &save);
    for (; c; c = strtok_r(NULL, "/", &save)) {
        if (strcmp(c, ".") == 0) continue;
        if (strcmp(c, "..") == 0) {
            char *slash = strrchr(out, '/');
            if (slash) *slash = 0;
            len = strlen(out);
            continue;
        }
        if (len + strlen(c) + 2 > cap) return -1;
        out[len++] = '/';
        strcpy(out + len, c);
        len += strlen(c);
    }
    if (!out[0]) strcpy(out, "/");
    *base = strrchr(out, '/') + 1;
    return 0;
}

static void buf_u64(buf_t *b, uint64_t v) {
    buf_u32(b, (uint32_t)(v >> 32));
    buf_u32(b, (uint32_t)v);
}

/* STAT: `str name`, `str path`, `u8 kind`, `u64 size`, `u32 mode`, `u32 uid`, `u32 gid`,
 * `u64 mtime_ns`, `str link`. */
static void send_stat(const char *name, const char *path, const struct stat *st, const char *link) {
    unsigned kind = S_ISREG(st->st_mode) ? 0 : S_ISDIR(st->st_mode) ? 1 : S_ISLNK(st->st_mode) ? 2
                  : S_ISFIFO(st->st_mode) ? 3 : S_ISSOCK(st->st_mode) ? 4 : S_ISCHR(st->st_mode) ? 5 : 6;
    buf_t b = {0};
    buf_str(&b, name);
    buf_str(&b, path);
    unsigned char k = (unsigned char)kind;
    buf_put(&b, &k, 1);
    buf_u64(&b, (uint64_t)st->st_size);
    buf_u32(&b, st->st_mode & 07777);
    buf_u32(&b, st->st_uid);
    buf_u32(&b, st->st_gid);
    buf_u64(&b, (uint64_t)((int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec));
    buf_str(&b, link ? link : "");
    send_buf(T_STAT, &b);
}

/* Describes `name` in the directory `dfd` (a link is described, not followed). */
static int stat_at(int dfd, const char *name, const char *shown, const char *path) {
    struct stat st;
    char link[4096] = "";
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) return -1;
    if (S_ISLNK(st.st_mode)) {
        ssize_t n = readlinkat(dfd, name, link, sizeof link - 1);
        link[n > 0 ? n : 0] = 0;
    }
    send_stat(shown, path, &st, S_ISLNK(st.st_mode) ? link : NULL);
    return 0;
}

static int name_cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Removes `name` (a directory, with what it holds) below `dfd`; links are removed, never followed. */
static int remove_tree(int dfd, const char *name) {
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        struct stat st;
        if (fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        if (S_ISDIR(st.st_mode)) rc = remove_tree(fd, e->d_name);
        else if (unlinkat(fd, e->d_name, 0) < 0 && errno != ENOENT) rc = -1;
    }
    int e2 = errno;
    closedir(d);
    if (rc < 0) {
        errno = e2;
        return -1;
    }
    return unlinkat(dfd, name, AT_REMOVEDIR);
}

static void do_fs(rd_t *r) {
    unsigned op = rd_u8(r);
    char *path = rd_str(r);
    unsigned flags = rd_u8(r);
    uint32_t mode = rd_u32(r);
    const char *root = exec_root();
    char norm[4096], parent[4096], *base;
    int rootfd = -1, pfd = -1, fd = -1;
    if (r->bad || r->off != r->len || path[0] != '/' || op > FS_REMOVE ||
        fs_normalize(path, norm, sizeof norm, &base) < 0) {
        send_error("FS: malformed request");
        goto out;
    }
    if (!root) {
        send_error("FS before SANDBOX");
        goto out;
    }
    if ((rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0) {
        send_error("%s: %s", root, strerror(errno));
        goto out;
    }
    snprintf(parent, sizeof parent, "%.*s", (int)(base - norm), norm);
    const char *shown = base[0] ? base : "/";
    if (op == FS_STAT && (flags & FSF_FOLLOW)) {
        struct stat st;
        char real[4200], link[4096];
        if ((fd = open_in_root(rootfd, norm, O_PATH, 1)) < 0 || fstat(fd, &st) < 0) goto fail;
        /* The path it resolved to, as the sandbox sees it. */
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, real, sizeof real - 1);
        real[n > 0 ? n : 0] = 0;
        size_t rl = strlen(root);
        const char *inside = strcmp(root, "/") == 0 ? real
                           : strncmp(real, root, rl) == 0 ? real + rl : norm;
        if (!inside[0]) inside = "/";
        const char *nm = strrchr(inside, '/');
        send_stat(nm && nm[1] ? nm + 1 : "/", inside, &st, NULL);
        goto out;
    }
    if (op == FS_LIST) {
        if ((fd = open_in_root(rootfd, norm, O_RDONLY | O_DIRECTORY, 1)) < 0) {
            if (errno == ENOTDIR) {
                send_error("%s: not a directory", path);
                goto out;
            }
            goto fail;
        }
        DIR *d = fdopendir(fd);
        if (!d) goto fail;
        fd = -1;
        size_t cnt = 0, cap = 64;
        char **names = malloc(cap * sizeof(char *));
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            if (cnt == cap) names = realloc(names, (cap *= 2) * sizeof(char *));
            names[cnt++] = strdup(e->d_name);
        }
        qsort(names, cnt, sizeof(char *), name_cmp);
        for (size_t i = 0; i < cnt; i++) {
            char full[8192];
            snprintf(full, sizeof full, "%s/%s", strcmp(norm, "/") == 0 ? "" : norm, names[i]);
            stat_at(dirfd(d), names[i], names[i], full); /* gone meanwhile: left out */
            free(names[i]);
        }
        free(names);
        closedir(d);
        send_frame(T_OK, NULL, 0);
        goto out;
    }
    if (op == FS_MKDIR && (flags & FSF_PARENTS)) {
        /* Each component in turn, below the one before (a link among them resolves inside). */
        char prefix[4096] = "";
        char copy[4096];
        snprintf(copy, sizeof copy, "%s", norm);
        char *save, *c = strtok_r(copy, "/", &save);
        for (; c; c = strtok_r(NULL, "/", &save)) {
            int dfd = open_in_root(rootfd, prefix[0] ? prefix : "/", O_PATH | O_DIRECTORY, 1);
            if (dfd < 0) goto fail;
            int rc = mkdirat(dfd, c, mode & 07777);
            int e = errno;
            close(dfd);
            if (rc < 0 && e != EEXIST) {
                errno = e;
                goto fail;
            }
            size_t pl = strlen(prefix);
            snprintf(prefix + pl, sizeof prefix - pl, "/%s", c);
        }
        int dfd = open_in_root(rootfd, norm, O_PATH | O_DIRECTORY, 1);
        if (dfd < 0) goto fail;
        close(dfd);
    }
    if (!base[0]) { /* the root itself */
        struct stat st;
        if (op == FS_REMOVE) {
            send_error("%s: the sandbox's root cannot be removed", path);
        } else if (op == FS_MKDIR && !(flags & FSF_PARENTS)) {
            send_error("%s: File exists", path);
        } else if (fstat(rootfd, &st) == 0) {
            send_stat("/", "/", &st, NULL);
        } else {
            goto fail;
        }
        goto out;
    }
    if ((pfd = open_in_root(rootfd, parent[0] ? parent : "/", O_PATH | O_DIRECTORY, 1)) < 0) {
        if (op == FS_STAT && (flags & FSF_MISSING_OK) && (errno == ENOENT || errno == ENOTDIR)) {
            send_frame(T_OK, NULL, 0);
            goto out;
        }
        goto fail;
    }
    if (op == FS_MKDIR && !(flags & FSF_PARENTS) && mkdirat(pfd, base, mode & 07777) < 0) goto fail;
    if (op == FS_REMOVE) {
        struct stat st;
        if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0) goto fail;
        int rc = !S_ISDIR(st.st_mode) ? unlinkat(pfd, base, 0)
               : (flags & FSF_RECURSIVE) ? remove_tree(pfd, base) : unlinkat(pfd, base, AT_REMOVEDIR);
        if (rc < 0) goto fail;
        send_frame(T_OK, NULL, 0);
        goto out;
    }
    if (stat_at(pfd, base, shown, norm) < 0) {
        if (op == FS_STAT && (flags & FSF_MISSING_OK) && errno == ENOENT) {
            send_frame(T_OK, NULL, 0);
            goto out;
        }
        goto fail;
    }
    goto out;
fail:
    send_error("%s: %s", path, strerror(errno));
out:
    if (fd >= 0) close(fd);
    if (pfd >= 0) close(pfd);
    if (rootfd >= 0) close(rootfd);
    free(path);
}

/* ---- PTY: a program on a pseudo-terminal of the guest ---- */

static unsigned rd_u16(rd_t *r) {
    unsigned hi = rd_u8(r);
    return (hi << 8) | rd_u8(r);
}

static void set_winsize(int fd, unsigned rows, unsigned cols) {
    struct winsize ws = {.ws_row = (unsigned short)(rows ? rows : 24), .ws_col = (unsigned short)(cols ? cols : 80)};
    ioctl(fd, TIOCSWINSZ, &ws);
}

/* PTY: as EXEC, but stdin, stdout and stderr are one terminal (its output comes as STDOUT; STDIN
 * frames are typed at it; WINSIZE resizes it, which the kernel says with SIGWINCH). */
static void do_pty(rd_t *r) {
    char **argv = rd_strlist(r, NULL);
    char **env = rd_strlist(r, NULL);
    char *user = rd_str(r), *workdir = rd_str(r);
    unsigned flags = rd_u8(r);
    unsigned rows = rd_u16(r), cols = rd_u16(r);
    const char *root = exec_root();
    int master = -1, statp[2] = {-1, -1}, pidfd = -1;
    unsigned char *chunk = NULL;
    buf_t pending = {0};
    size_t sent = 0;
    char pts[128];
    if (r->bad || r->off != r->len || !argv[0] || flags) {
        send_error("PTY: malformed request");
        goto out;
    }
    if (!root) {
        send_error("PTY before SANDBOX");
        goto out;
    }
    if ((master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 || grantpt(master) < 0 ||
        unlockpt(master) < 0 || ptsname_r(master, pts, sizeof pts) != 0 ||
        pipe2(statp, O_CLOEXEC) < 0) {
        send_error("PTY: cannot open a terminal: %s", strerror(errno));
        goto out;
    }
    set_winsize(master, rows, cols);
    long oom0 = oom_kills();
    pid_t pid = fork();
    if (pid < 0) {
        send_error("PTY: fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        setsid();
        int slave = open(pts, O_RDWR);
        if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0)
            child_fail(statp[1], "PTY: %s: %s", pts, strerror(errno));
        for (int i = 0; i < 3; i++) dup2(slave, i);
        if (slave > 2) close(slave);
        exec_child(root, argv, env, user, workdir, statp[1]);
    }
    close(statp[1]);
    statp[1] = -1;
    if (child_started(statp[0], pid) < 0) goto out;
    send_pid(pid);
    fcntl(master, F_SETFL, O_NONBLOCK);
    pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    chunk = malloc(CHUNK);
    int status = 0, exited = 0, master_open = 1;
    while (!exited) {
        struct pollfd pf[3] = {
            {master_open ? master : -1, POLLIN | (pending.len > sent ? POLLOUT : 0), 0},
            {channel_up ? chan_in : -1, POLLIN, 0}, {pidfd, POLLIN, 0},
        };
        if (poll(pf, 3, pidfd >= 0 ? -1 : 20) < 0 && errno != EINTR) break;
        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(master, chunk, CHUNK);
            if (n > 0) send_frame(T_STDOUT, chunk, (size_t)n);
            else if (n == 0 || (errno != EINTR && errno != EAGAIN)) master_open = 0; /* EIO: no one holds it */
        }
        if (master_open && (pf[0].revents & POLLOUT)) {
            ssize_t w = write(master, pending.p + sent, pending.len - sent);
            if (w > 0) sent += (size_t)w;
        }
        if (pf[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            unsigned char *payload;
            size_t n;
            int t = (pf[1].revents & POLLIN) ? recv_frame(&payload, &n) : -1;
            if (t == T_NONE) {
            } else if (t < 0) {
                kill(-pid, SIGHUP); /* the session ended: as a terminal hanging up */
                kill(-pid, SIGCONT);
                channel_up = 0;
            } else {
                rd_t w = {payload, n, 0, 0};
                if (t == T_KILL) kill(-pid, n >= 1 ? payload[0] : SIGKILL);
                if (t == T_STDIN && n) buf_put(&pending, payload, n);
                if (t == T_WINSIZE) {
                    unsigned wr = rd_u16(&w), wc = rd_u16(&w);
                    if (!w.bad) set_winsize(master, wr, wc);
                }
                free(payload);
            }
        }
        if (waitpid(pid, &status, WNOHANG) == pid) exited = 1;
    }
    if (!exited) while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    ssize_t n;
    while (master_open && (n = read(master, chunk, CHUNK)) > 0) send_frame(T_STDOUT, chunk, (size_t)n);
    close(master); /* the terminal is gone before the host hears the exit */
    master = -1;
    say_oom(status, oom0);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    buf_t b = {0};
    buf_u32(&b, (uint32_t)code);
    buf_u32(&b, (uint32_t)sig);
    send_buf(T_EXIT, &b);
out:
    if (pidfd >= 0) close(pidfd);
    if (master >= 0) close(master);
    for (int i = 0; i < 2; i++)
        if (statp[i] >= 0) close(statp[i]);
    free(chunk);
    free(pending.p);
    free_strlist(argv);
    free_strlist(env);
    free(user);
    free(workdir);
}

/* ---- sessions (version 4) ----
 *
 * Session 0 is the main agent's: the build's and the sandbox set-up's requests, as in version 3.
 * A frame of any other session goes to that session's worker: a process forked from the agent on
 * the session's first frame, which serves its requests one at a time (reading them from a socket
 * the agent forwards them on) and writes its frames straight to the channel, tagged with its
 * session, one whole frame at a time under a lock. END (or the host leaving) closes the socket:
 * the worker finishes as if its host had gone (a running EXEC is killed, a FREEZE undone). */

#define MAX_SESSIONS 256
/* What the agent forwards to a worker waits in `out` while the worker does not read (a PUT
 * whose tar a FREEZE stopped): the channel is never held up by one session. */
#define MAX_PENDING (64u << 20)
typedef struct { unsigned id; pid_t pid; int fd; buf_t out; size_t sent; } session_t;
static session_t sessions[MAX_SESSIONS];
static int n_sessions = 0;

static void end_session(session_t *s) {
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    free(s->out.p);
    s->out = (buf_t){0};
    s->sent = 0;
}

/* Writes what waits for the worker, as far as its socket takes it. */
static void flush_session(session_t *s) {
    while (s->fd >= 0 && s->sent < s->out.len) {
        ssize_t w = write(s->fd, s->out.p + s->sent, s->out.len - s->sent);
        if (w > 0) {
            s->sent += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            if (w < 0 && errno == EAGAIN) return;
            end_session(s); /* the worker is gone */
            return;
        }
    }
    if (s->sent == s->out.len) {
        s->out.len = 0;
        s->sent = 0;
    }
}

static void flush_sessions(void) {
    for (int i = 0; i < n_sessions; i++) flush_session(&sessions[i]);
}

static void reap_sessions(void) {
    int j = 0;
    for (int i = 0; i < n_sessions; i++) {
        session_t *s = &sessions[i];
        if (s->pid > 0 && waitpid(s->pid, NULL, WNOHANG) == s->pid) {
            s->pid = 0;
            end_session(s);
        }
        if (s->pid > 0 || s->fd >= 0) sessions[j++] = *s;
    }
    n_sessions = j;
}

static void close_sessions(void) {
    for (int i = 0; i < n_sessions; i++) end_session(&sessions[i]);
    reap_sessions();
}

static void worker_main(unsigned id, int sock) {
    for (int i = 0; i < n_sessions; i++) end_session(&sessions[i]);
    n_sessions = 0;
    is_worker = 1;
    my_session = (int)id;
    chan_in = sock;
    entry_pid = -1;
    prctl(PR_SET_NAME, "tl-session", 0, 0, 0);
    signal(SIGCHLD, SIG_DFL);
    for (;;) {
        unsigned char *payload;
        size_t n;
        int t = recv_frame(&payload, &n);
        if (t < 0) break;
        rd_t r = {payload, n, 0, 0};
        switch (t) {
        case T_EXEC: do_exec(&r); break;
        case T_PTY: do_pty(&r); break;
        case T_PUT: do_put(&r); break;
        case T_GET: do_get(&r); break;
        case T_FS: do_fs(&r); break;
        case T_SIGNAL: do_signal(&r); break;
        case T_EXPORT: do_export(&r); break;
        case T_ATTACH: do_attach(&r); break;
        case T_FREEZE: do_freeze(1); break;
        case T_THAW: do_freeze(0); break;
        case T_KILL: case T_STDIN: case T_TAR: case T_WINSIZE: break; /* after their request */
        case T_MOUNT: case T_UMOUNT: case T_RUN: case T_SANDBOX: case T_SPAWN: case T_BIND:
        case T_UNBIND: case T_SHUTDOWN:
            send_error("request 0x%02x is only valid on session 0", t);
            break;
        default: send_error("unknown request type 0x%02x", t);
        }
        free(payload);
    }
    if (frozen) signal_guest(SIGCONT);
    _exit(0);
}

static void route(unsigned id, unsigned type, const unsigned char *h, const unsigned char *payload,
                  size_t n) {
    reap_sessions();
    flush_sessions();
    session_t *s = NULL;
    for (int i = 0; i < n_sessions; i++)
        if (sessions[i].id == id && sessions[i].fd >= 0) s = &sessions[i];
    if (type == T_END) {
        if (s) end_session(s);
        return;
    }
    if (!s) {
        /* Data for a request that ended with its session: nobody reads it. */
        if (type == T_KILL || type == T_STDIN || type == T_TAR || type == T_WINSIZE) return;
        int sv[2];
        if (n_sessions >= MAX_SESSIONS) {
            const char *msg = "too many sessions";
            buf_t b = {0};
            buf_str(&b, msg);
            send_frame_on(id, T_ERROR, b.p, b.len);
            free(b.p);
            return;
        }
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
            buf_t b = {0};
            buf_str(&b, strerror(errno));
            send_frame_on(id, T_ERROR, b.p, b.len);
            free(b.p);
            return;
        }
        int big = 4 << 20;
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        pid_t pid = fork();
        if (pid == 0) {
            close(sv[0]);
            worker_main(id, sv[1]);
        }
        close(sv[1]);
        if (pid < 0) {
            close(sv[0]);
            return;
        }
        fcntl(sv[0], F_SETFL, O_NONBLOCK);
        s = &sessions[n_sessions++];
        *s = (session_t){id, pid, sv[0], {0}, 0};
    }
    if (s->out.len - s->sent + 8 + n > MAX_PENDING) { /* a worker that reads nothing more */
        end_session(s);
        return;
    }
    buf_put(&s->out, h, 8);
    if (n) buf_put(&s->out, payload, n);
    flush_session(s);
}

/* Between requests in sandbox mode: reap the entrypoint, and ride out a host that went away
 * (the virtio port reports POLLHUP until a host connects again). */
static void idle_wait(void) {
    for (;;) {
        check_entry();
        reap_sessions();
        flush_sessions();
        struct pollfd pf[2 + MAX_SESSIONS] = {{chan_in, POLLIN, 0}, {sigchld_pipe[0], POLLIN, 0}};
        int npf = 2;
        for (int i = 0; i < n_sessions; i++)
            if (sessions[i].fd >= 0 && sessions[i].sent < sessions[i].out.len)
                pf[npf++] = (struct pollfd){sessions[i].fd, POLLOUT, 0};
        if (poll(pf, (nfds_t)npf, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        if (pf[1].revents & POLLIN) drain_fd(sigchld_pipe[0]);
        if (pf[0].revents & POLLHUP) {
            if (stdio_mode) return;
            if (channel_up) close_sessions(); /* their host went with it */
            channel_up = 0;
            usleep(50000);
            continue;
        }
        if (pf[0].revents & (POLLIN | POLLERR)) {
            channel_up = 1;
            return;
        }
    }
}

/* ---- main loop ---- */

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--stdio") == 0) {
        stdio_mode = 1;
        chan_in = dup(0);
        chan_out = dup(1);
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 0);
        if (devnull > 2) close(devnull);
        dup2(2, 1);
    } else if (argc == 2) {
        chan_in = chan_out = open(argv[1], O_RDWR | O_CLOEXEC);
        if (chan_in < 0) die("open %s: %s", argv[1], strerror(errno));
    } else {
        die("usage: agent CHANNEL_DEVICE | agent --stdio");
    }
    fcntl(chan_in, F_SETFD, FD_CLOEXEC);
    fcntl(chan_out, F_SETFD, FD_CLOEXEC);
    const char *ifd = getenv("TL_INIT_FD");
    if (ifd && !stdio_mode) {
        init_fd = atoi(ifd);
        if (fcntl(init_fd, F_SETFD, FD_CLOEXEC) < 0) init_fd = -1;
        unsetenv("TL_INIT_FD");
    }
    signal(SIGPIPE, SIG_IGN);
    lock_fd = (int)syscall(SYS_memfd_create, "tl-channel", 1u /* MFD_CLOEXEC */);
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0) die("pipe: %s", strerror(errno));
    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);

    buf_t hello = {0};
    unsigned char v[2] = {PROTOCOL_VERSION >> 8, PROTOCOL_VERSION & 0xff};
    buf_put(&hello, v, 2);
    buf_str(&hello, "tl-agent");
    send_buf(T_HELLO, &hello);

    for (;;) {
        unsigned char *payload;
        size_t n;
        if (sandbox_mode || n_sessions) idle_wait();
        int t = recv_frame(&payload, &n);
        if (t == T_NONE) continue;
        if (t < 0) {
            close_sessions();
            if (sandbox_mode && !stdio_mode) {
                channel_up = 0;
                continue; /* the host comes back with ATTACH */
            }
            break;
        }
        rd_t r = {payload, n, 0, 0};
        switch (t) {
        case T_MOUNT: do_mount(&r); break;
        case T_UMOUNT: do_umount(&r); break;
        case T_RUN: do_run(&r); break;
        case T_EXPORT: do_export(&r); break;
        /* No step running: nothing to kill, and no reply — a KILL that races the end of a step
         * must not leave a frame on the channel for whoever sends the next request. */
        case T_KILL: break;
        case T_SANDBOX: do_sandbox(&r); break;
        case T_EXEC: do_exec(&r); break;
        case T_SPAWN: do_spawn(&r); break;
        case T_PUT: do_put(&r); break;
        case T_GET: do_get(&r); break;
        case T_ATTACH:
            close_sessions(); /* a new host: the sessions of the one before are over */
            do_attach(&r);
            break;
        case T_FS: do_fs(&r); break;
        case T_PTY: do_pty(&r); break;
        case T_SIGNAL: do_signal(&r); break;
        case T_END: case T_WINSIZE: break;
        case T_BIND: do_bind(&r); break;
        case T_UNBIND: do_unbind(); break;
        case T_FREEZE: do_freeze(1); break; /* every process but init and the agent's */
        case T_THAW: do_freeze(0); break;
        case T_STDIN: /* after its EXEC ended: nothing reads it */
        case T_TAR: break;
        case T_SHUTDOWN:
            send_frame(T_OK, NULL, 0);
            free(payload);
            if (!stdio_mode) {
                sync();
                /* systemd stops its units, then resets the VM itself (and ends the agent) */
                if (init_booted && kill(1, SIGRTMIN + 5) == 0) for (;;) pause();
                reboot(RB_AUTOBOOT); /* QEMU runs with -no-reboot: a reset ends the VM */
            }
            return 0;
        default: send_error("unknown request type 0x%02x", t);
        }
        free(payload);
    }
    if (!stdio_mode) {
        sync();
        reboot(RB_AUTOBOOT);
    }
    return 0;
}
