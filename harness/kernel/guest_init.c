/* PID 1 of an afterclose kernel-matrix guest: a static binary in the initramfs.
 *
 * It loads the modules listed in /modules/order (9p, overlay, ...), mounts the host's root
 * file system (shared read-only over 9p as "host0") under a tmpfs overlay so the guest can
 * write anywhere without touching the host, mounts the read-write results share ("results")
 * at /run/afterclose-results, brings loopback up, and runs the command the host left in
 * /run/afterclose-results/init.argv (NUL-separated) inside that root.  It reaps every orphan
 * while the command runs, writes the command's wait status to init.status, and powers off.
 *
 * Messages go to /dev/console (the serial port), prefixed "afterclose-init:", so the host can
 * quote them when a boot goes wrong.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define RESULTS "/run/afterclose-results"
#define MAX_ARGS 256

static void say(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    fputs("afterclose-init: ", stderr);
    fwrite(buf, 1, (size_t)n, stderr);
    fflush(stderr);
}

static void power_off(void) {
    sync();
    reboot(RB_POWER_OFF);
    /* Only reached if the kernel refused: panic=-1 on the command line turns PID 1's exit
     * into a reboot, which qemu's -no-reboot turns into an exit. */
    _exit(1);
}

static void die(const char *what) {
    say("FATAL: %s: %s", what, strerror(errno));
    power_off();
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long flags,
                       const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) != 0) {
        say("mount %s on %s (%s, %s) failed", src, dst, type, data ? data : "");
        die("mount");
    }
}

static void try_mount(const char *src, const char *dst, const char *type, const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, 0, data) != 0)
        say("note: mount %s on %s failed: %s", type, dst, strerror(errno));
}

static void load_modules(void) {
    FILE *order = fopen("/modules/order", "r");
    if (order == NULL)
        return;
    char line[512];
    while (fgets(line, sizeof line, order) != NULL) {
        line[strcspn(line, "\n")] = 0;
        if (line[0] == 0)
            continue;
        char path[600];
        snprintf(path, sizeof path, "/modules/%s", line);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            say("cannot open module %s: %s", path, strerror(errno));
            continue;
        }
        /* EEXIST: built in after all, or loaded as another module's dependency. */
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            say("loading %s failed: %s", line, strerror(errno));
        close(fd);
    }
    fclose(order);
}

static void loopback_up(void) {
    /* A fresh network namespace has lo down: every connect to 127.0.0.1 would fail with
     * ENETUNREACH until it is brought up. */
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) != 0)
        die("SIOCGIFFLAGS lo");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0)
        die("SIOCSIFFLAGS lo");
    close(s);
}

static int read_argv(char **argv, char *buf, size_t size) {
    int fd = open(RESULTS "/init.argv", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open " RESULTS "/init.argv");
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n <= 0)
        die("read init.argv");
    buf[n] = 0;
    int argc = 0;
    for (char *p = buf; p < buf + n && argc < MAX_ARGS - 1; p += strlen(p) + 1)
        argv[argc++] = p;
    argv[argc] = NULL;
    return argc;
}

static void write_status(int status) {
    int fd = open(RESULTS "/init.status", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%d\n", status);
    if (write(fd, buf, (size_t)n) != n)
        say("writing init.status failed");
    fsync(fd);
    close(fd);
}

int main(void) {
    must_mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int con = open("/dev/console", O_RDWR | O_NOCTTY);
    if (con >= 0) {
        dup2(con, 0);
        dup2(con, 1);
        dup2(con, 2);
        if (con > 2)
            close(con);
    }
    must_mount("proc", "/proc", "proc", 0, NULL);
    must_mount("sysfs", "/sys", "sysfs", 0, NULL);
    load_modules();

    /* cache=loose: the host's root does not change under a test run, and without a cache
     * every Python import walks 9p for each stat. msize raises the 8 KiB default. */
    must_mount("host0", "/lower", "9p", MS_RDONLY,
               "trans=virtio,version=9p2000.L,cache=loose,msize=512000");
    must_mount("tmpfs", "/upper", "tmpfs", 0, "mode=0755");
    mkdir("/upper/u", 0755);
    mkdir("/upper/w", 0755);
    /* 9p has no file handles to export and no xattr-based whiteouts on a read-only share:
     * index and redirect_dir must stay off or overlay refuses the lower layer. */
    must_mount("overlay", "/newroot", "overlay", 0,
               "lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w,index=off,redirect_dir=off");
    must_mount("results", "/newroot" RESULTS, "9p", 0,
               "trans=virtio,version=9p2000.L,cache=none,msize=512000");
    must_mount("proc", "/newroot/proc", "proc", 0, NULL);
    must_mount("sysfs", "/newroot/sys", "sysfs", 0, NULL);
    must_mount("devtmpfs", "/newroot/dev", "devtmpfs", 0, NULL);
    try_mount("devpts", "/newroot/dev/pts", "devpts", "ptmxmode=0666");
    /* POSIX semaphores (multiprocessing) live in /dev/shm. */
    try_mount("tmpfs", "/newroot/dev/shm", "tmpfs", "mode=1777");
    /* No tmpfs on /tmp: the host's /tmp (where a test run's folders may be) stays visible,
     * and the overlay already keeps the guest's writes there in guest memory. */
    try_mount("cgroup2", "/newroot/sys/fs/cgroup", "cgroup2", NULL);
    try_mount("tracefs", "/newroot/sys/kernel/tracing", "tracefs", NULL);
    try_mount("debugfs", "/newroot/sys/kernel/debug", "debugfs", NULL);
    try_mount("bpf", "/newroot/sys/fs/bpf", "bpf", "mode=0700");
    loopback_up();

    if (chroot("/newroot") != 0 || chdir("/") != 0)
        die("chroot /newroot");
    static char buf[65536];
    char *argv[MAX_ARGS];
    read_argv(argv, buf, sizeof buf);
    say("running %s", argv[0]);

    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        char *envp[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "PYTHONDONTWRITEBYTECODE=1",
                        NULL};
        execve(argv[0], argv, envp);
        say("exec %s failed: %s", argv[0], strerror(errno));
        _exit(127);
    }
    int status = 0;
    for (;;) {
        int st;
        pid_t pid = wait(&st);
        if (pid == child) {
            status = st;
            break;
        }
        if (pid < 0 && errno == ECHILD)
            break;
    }
    say("command ended with wait status %d", status);
    write_status(status);
    /* Orphans still alive (a target the command failed to stop) die with the guest. */
    power_off();
    return 0;
}
